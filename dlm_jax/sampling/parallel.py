"""Parallel decoding: commit rules that unmask a variable number of [MASK]s per forward (DESIGN.md section 8).

Every rule commits at least what the `topk_confidence` schedule would (its floor: with --steps equal to the
number of masked tokens, exactly the most confident one per step), plus the masked positions it judges safe:
  threshold  Fast-dLLM (Wu et al. 2025): every position whose drawn token has probability >= min_confidence
  factor     Fast-dLLM: confidences sorted c_1 >= c_2 >= ...: the longest prefix with (i + 1)(1 - c_i) <= factor
  prophet    Prophet (Li et al. 2025): all of them, once the mean top-1 / top-2 logit gap of the masked positions
             reaches gap, 2/3 gap or 1/3 gap (progress < 1/3, < 2/3, later)
  sched      SchED: all of them, once that mean gap reaches a threshold falling linearly from gap to gap_end
  ccd        CCD: the positions whose argmax stayed the same over the last `stable_steps` forwards
These run in a `lax.while_loop` that exits once no active [MASK] is left, so NFE is the number of forwards run.
  rcr        RCR (running confidence remasking, MDPO, He et al. 2025): the topk schedule over every generated
             position at once, a committed token keeping the confidence it was committed with; a [MASK] more
             confident than a committed token takes its place in the budget and the committed one is re-masked
             (one `lax.scan` of --steps forwards; known tokens are never re-masked)
  saber      Saber (Dong et al. 2025): every [MASK] at least as confident as the mean commit-time confidence of
             the tokens committed so far (the top-1 at the start); backtracking: up to `remask` committed tokens
             whose probability under the current forward fell by more than `min_drop` since their commit are
             re-masked, and as many more [MASK]s commit, so every step still unmasks >= 1 net (`lax.while_loop`)
The runners are methods of a mixin of `MaskedSampling`, so every masked sampler (semi_ar, block, the Fast-dLLM
caches) runs them as its `inner` rule.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dlm_jax.errors import UserError
from dlm_jax.sampling.loop import SamplerState, SampleSpec, argmax_last, option

Array = jax.Array
PARALLEL_RULES = ("threshold", "factor", "prophet", "sched", "ccd")
REMASKING_RULES = ("rcr", "saber")


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
    """The parallel rules' thresholds (mixed into the options of every sampler with an `inner` rule)."""

    min_confidence: float = option(0.9, "threshold: commit every [MASK] whose token has at least this probability")
    factor: float = option(1.0, "factor: commit the longest confidence-sorted prefix with (i + 1)(1 - c_i) <= factor")
    gap: float = option(7.5, "prophet / sched: mean top-1 / top-2 logit gap at which every [MASK] commits at once")
    gap_end: float = option(2.5, "sched: the gap threshold at the end (it falls linearly from --sampler.gap)")
    stable_steps: int = option(2, "ccd: commit a [MASK] whose argmax stayed the same over this many forwards")
    remask: int = option(1, "saber: at most this many committed tokens re-masked per step")
    min_drop: float = option(0.3, "saber: re-mask a committed token whose probability fell by more than this")


DEFAULTS = ParallelOptions()
LOWEST = {"stable_steps": 1, "remask": 0, "min_drop": 0.0}  # the smallest value each count / margin may take


def check_parallel_options(spec: SampleSpec) -> None:
    """One-line error for a parallel rule's knob below its range (the rest are any finite number)."""
    for name, lowest in LOWEST.items():
        value = spec.option(name, lowest)
        if value < lowest:
            raise UserError(f"--sampler.{name}={value} must be >= {lowest}")


# -- commit rules: pure functions of confidences and masks ([N, L] unless said) --------------------------------
def draw_confidence(logits: Array, x0: Array) -> Array:
    """softmax(logits)[x0]: the probability of each drawn token (the confidence the rules rank by)."""
    return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), x0[..., None], axis=-1)[..., 0]


def confidence_rank(confidence: Array, todo: Array) -> Array:
    """Rank of each position of `todo` by confidence, 0 = most confident (ties: lower index first)."""
    confidence = jnp.where(todo, confidence, -jnp.inf)
    return jnp.argsort(jnp.argsort(-confidence, axis=-1, stable=True), axis=-1, stable=True)


def topk_commit(confidence: Array, todo: Array, k: Array) -> Array:
    """MaskGIT / LLaDA: the k [N] most confident positions of `todo` commit."""
    return todo & (confidence_rank(confidence, todo) < k[:, None])


def threshold_commit(confidence: Array, todo: Array, min_confidence: float) -> Array:
    """Fast-dLLM threshold rule: every position of `todo` with confidence >= min_confidence."""
    return todo & (confidence >= min_confidence)


def factor_commit(confidence: Array, todo: Array, factor: float) -> Array:
    """Fast-dLLM factor rule: with c_1 >= c_2 >= ... the confidences of `todo`, the longest prefix of ranks
    i = 1, 2, ... with (i + 1)(1 - c_i) <= factor."""
    rank = confidence_rank(confidence, todo)
    ranked = jnp.take_along_axis(jnp.where(todo, confidence, -jnp.inf), jnp.argsort(rank, axis=-1), axis=-1)
    i = jnp.arange(1, todo.shape[-1] + 1)
    fits = (ranked > -jnp.inf) & ((i + 1) * (1.0 - ranked) <= factor)
    count = jnp.cumprod(fits, axis=-1).sum(-1)  # [N]: length of the prefix that fits
    return todo & (rank < count[:, None])


def backtrack_remask(drop: Array, budget: Array, min_drop: float) -> Array:
    """Saber's backtracking: of the positions whose confidence `drop` [N, L] exceeds min_drop, the `budget` [N] with
    the largest drops (positions that may not be re-masked carry drop -inf)."""
    fell = drop > min_drop
    return fell & (confidence_rank(drop, fell) < budget[:, None])


def top_gap(logits: Array) -> Array:
    """Top-1 minus top-2 logit per position: [N, L, V] -> [N, L]."""
    top2 = jax.lax.top_k(logits, 2)[0]
    return top2[..., 0] - top2[..., 1]


def fill_all_commit(gap: Array, todo: Array, threshold: Array) -> Array:
    """Prophet / SchED early commit: every position of `todo` in the rows whose mean gap over `todo` reaches
    `threshold` [N]."""
    count = todo.sum(-1)
    mean_gap = jnp.where(todo, gap, 0.0).sum(-1) / jnp.maximum(count, 1)
    return todo & (mean_gap >= threshold)[:, None]


def prophet_threshold(progress: Array, gap: float) -> Array:
    """Prophet's staged gap threshold: gap, 2/3 gap, 1/3 gap for progress (decoded fraction) < 1/3, < 2/3, later."""
    return jnp.where(progress < 1.0 / 3.0, gap, jnp.where(progress < 2.0 / 3.0, gap * 2.0 / 3.0, gap / 3.0))


def sched_threshold(progress: Array, gap: float, gap_end: float) -> Array:
    """SchED's smooth threshold: linear from `gap` (nothing decoded) to `gap_end` (all decoded)."""
    return gap + (gap_end - gap) * progress


def stable_streak(argmax: Array, previous: Array, streak: Array) -> Array:
    """Forwards in a row (this one included) in which each position's argmax stayed the same (CCD)."""
    return jnp.where(argmax == previous, streak + 1, 1)


class ParallelDecoding:
    """The parallel-rule runners of `MaskedSampling` (this mixin uses its predict / propose / todo / grid helpers)."""

    spec: Any
    mask_id: int
    schedule: Any

    def runner(self, name: str) -> Callable[..., SamplerState]:
        """The runner of a masked rule name: a `MaskedSampling` method, or the parallel loop with that rule."""
        if name in PARALLEL_RULES:
            return functools.partial(self.parallel, rule=name)
        return getattr(self, name)

    def parallel_option(self, name: str) -> Any:
        return self.spec.option(name, getattr(DEFAULTS, name))

    def rule_time(self, todo: Array, m0: Array) -> Array:
        """The time [N] whose mask rate is the masked fraction of the rule's positions (1 at the start)."""
        return self.schedule.time_at_mask_rate(todo.sum(-1) / jnp.maximum(m0, 1))

    def propose_step(self, logits_fn: Callable, state: SamplerState, active: Array, m0: Array, primed: Array | None,
                     first: Array) -> tuple[Array, Array, Array, Array, Array, Array]:
        """What a rule's step starts with: (todo: the active [MASK]s, logits of one forward at their time (the primed
        ones on the first step), the proposal x0, its confidence, the state's next rng, forwards run)."""
        todo = self.todo(state.tokens, active)
        t = self.rule_time(todo, m0)
        logits, forwards = self.first_or_predict(logits_fn, state.tokens, t, primed, first)
        rng, rng_x0 = jax.random.split(state.rng)
        x0 = self.propose(rng_x0, logits, state.tokens, t)
        return todo, logits, x0, draw_confidence(logits, x0), rng, forwards

    def parallel(self, logits_fn: Callable, state: SamplerState, active: Array, steps: int,
                 primed: Array | None = None, *, rule: str) -> SamplerState:
        """Until no active [MASK] is left: one forward, the proposal, then the schedule's floor plus `rule`'s
        commits (see the module doc); at most `steps` forwards (the floor alone finishes in `steps`)."""
        m0 = self.todo(state.tokens, active).sum(-1)  # [N]

        def step(carry: tuple[SamplerState, Array, Array, Array]) -> tuple[SamplerState, Array, Array, Array]:
            st, i, previous, streak = carry
            todo, logits, x0, confidence, rng, forwards = self.propose_step(logits_fn, st, active, m0, primed, i == 0)
            floor = jnp.maximum(todo.sum(-1) - self.keep_masked(m0, i, steps), 1)  # >= 1 commit per forward
            commit = topk_commit(confidence, todo, floor)
            progress = 1.0 - todo.sum(-1) / jnp.maximum(m0, 1)
            if rule == "ccd":  # only CCD tracks the argmax history (the other rules carry it unchanged)
                argmax = argmax_last(logits)
                previous, streak = argmax, stable_streak(argmax, previous, streak)
            if rule == "threshold":
                commit |= threshold_commit(confidence, todo, self.parallel_option("min_confidence"))
            elif rule == "factor":
                commit |= factor_commit(confidence, todo, self.parallel_option("factor"))
            elif rule == "prophet":
                threshold = prophet_threshold(progress, self.parallel_option("gap"))
                commit |= fill_all_commit(top_gap(logits), todo, threshold)
            elif rule == "sched":
                threshold = sched_threshold(progress, self.parallel_option("gap"), self.parallel_option("gap_end"))
                commit |= fill_all_commit(top_gap(logits), todo, threshold)
            elif rule == "ccd":
                commit |= todo & (streak >= self.parallel_option("stable_steps"))
            st = st.replace(tokens=jnp.where(commit, x0, st.tokens), rng=rng, step=st.step + 1, nfe=st.nfe + forwards)
            return st, i + 1, previous, streak

        def keep_going(carry: tuple[SamplerState, Array, Array, Array]) -> Array:
            return jnp.any(self.todo(carry[0].tokens, active)) & (carry[1] < steps)

        no_argmax = jnp.full(state.tokens.shape, -1, jnp.int32)
        start = (state, jnp.int32(0), no_argmax, jnp.zeros(state.tokens.shape, jnp.int32))
        return jax.lax.while_loop(keep_going, step, start)[0]

    def rcr(self, logits_fn: Callable, state: SamplerState, active: Array, steps: int,
            primed: Array | None = None) -> SamplerState:
        """Running confidence remasking: after step i the `topk_confidence` schedule's number of generated positions
        is unmasked, chosen by confidence among [MASK]s (this step's) and committed tokens (their commit-time
        confidence); a committed token pushed out of the budget is re-masked."""
        generated = self.todo(state.tokens, active)  # the positions this run decides; known tokens never move
        m0 = generated.sum(-1)  # [N]

        def step(carry: tuple[SamplerState, Array], i: Array) -> tuple[tuple[SamplerState, Array], None]:
            st, held = carry  # held [N, L]: the confidence each committed token was committed with
            todo, logits, x0, confidence, rng, forwards = self.propose_step(logits_fn, st, active, m0, primed, i == 0)
            score = jnp.where(todo, confidence, held)
            keep = topk_commit(score, generated, m0 - self.keep_masked(m0, i, steps))
            tokens = jnp.where(keep & todo, x0, jnp.where(generated & ~keep, self.mask_id, st.tokens))
            held = jnp.where(keep, score, 0.0)
            st = st.replace(tokens=tokens, rng=rng, step=st.step + 1, nfe=st.nfe + forwards)
            return (st, held), None

        held = jnp.zeros(state.tokens.shape, jnp.float32)
        return jax.lax.scan(step, (state, held), jnp.arange(steps))[0][0]

    def saber(self, logits_fn: Callable, state: SamplerState, active: Array, steps: int,
              primed: Array | None = None) -> SamplerState:
        """Saber: commit every [MASK] with confidence >= the running mean of commit-time confidences (the top-1 on
        the first step), re-mask committed tokens whose probability fell the most (at most `remask`, each by more
        than `min_drop`) and commit as many more, within the `topk_confidence` schedule (done in `steps`)."""
        generated = self.todo(state.tokens, active)  # the positions this run decides; known tokens never move
        m0 = generated.sum(-1)  # [N]
        max_remask, min_drop = self.parallel_option("remask"), self.parallel_option("min_drop")

        def step(carry: tuple[SamplerState, Array, Array, Array, Array]) -> tuple[SamplerState, Array, Array, Array,
                                                                                   Array]:
            st, i, held, total, count = carry  # held [N, L]: commit-time confidences; total / count [N]: their mean
            todo, logits, x0, confidence, rng, forwards = self.propose_step(logits_fn, st, active, m0, primed, i == 0)
            masked, keep = todo.sum(-1), self.keep_masked(m0, i, steps)
            # how this forward scores the committed tokens (their logits are the backbone's own: SUBS drops only [MASK])
            now = draw_confidence(logits, st.tokens)
            drop = jnp.where(generated & ~todo, held - now, -jnp.inf)
            budget = jnp.clip(jnp.minimum(max_remask, jnp.minimum(keep, masked - 1)), 0)  # net progress >= 1
            remask = backtrack_remask(drop, budget, min_drop)
            redo = remask.sum(-1)
            mean = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.where(todo, confidence, 0.0).max(-1))
            floor = jnp.maximum(masked - keep + redo, 1 + redo)  # the schedule, and one more than re-masked
            commit = topk_commit(confidence, todo, floor) | threshold_commit(confidence, todo, mean[:, None])
            tokens = jnp.where(commit, x0, jnp.where(remask, self.mask_id, st.tokens))
            held = jnp.where(commit, confidence, jnp.where(remask, 0.0, held))
            total, count = total + jnp.where(commit, confidence, 0.0).sum(-1), count + commit.sum(-1)
            st = st.replace(tokens=tokens, rng=rng, step=st.step + 1, nfe=st.nfe + forwards)
            return st, i + 1, held, total, count

        def keep_going(carry: tuple[SamplerState, Array, Array, Array, Array]) -> Array:
            return jnp.any(self.todo(carry[0].tokens, active)) & (carry[1] < steps)

        n = state.tokens.shape[0]
        start = (state, jnp.int32(0), jnp.zeros(state.tokens.shape, jnp.float32), jnp.zeros((n,), jnp.float32),
                 jnp.zeros((n,), jnp.int32))
        return jax.lax.while_loop(keep_going, step, start)[0]
