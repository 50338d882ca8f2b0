"""Masked-diffusion samplers (MDLM / MD4 reverse processes), each one jitted `lax.scan` / `lax.while_loop`.

Every sampler starts from a template: [MASK] where tokens are to be generated, known tokens (a prompt, infill
context) elsewhere. Only [MASK] positions ever change (SUBS carry-over), so known tokens stay fixed.
  ancestral       MDLM sec. 3.3: on the grid t: 1 -> eps, unmask each [MASK] with prob
                  (alpha_s - alpha_t) / (1 - alpha_t), its token ~ p_theta(x_0 | z_t)
  cached          the same draws, but when nothing changed since the last forward (and the model ignores t)
                  the last prediction is reused: the forward is skipped with `lax.cond` (MDLM's caching)
  first_hitting   Zheng et al. 2024: jump to the time the next token unmasks, unmask exactly one uniformly
                  chosen [MASK] (a `while_loop`: NFE = number of masked tokens)
  topk_confidence MaskGIT / LLaDA: commit the k most confident predictions per step, k from a linear or
                  cosine schedule of how many tokens stay masked
  semi_ar         blocks left to right; any of the above inside each block (Arriola et al. 2025 / LLaDA)
  threshold, factor, prophet, sched, ccd, rcr   parallel decoding: a variable number of commits per forward
                  (sampling/parallel.py), as the rule inside semi_ar, block or the Fast-dLLM caches
Every rule is a proposal (x0 candidates: by default x0 ~ p_theta(x0 | z_t)) followed by a commit rule (which
[MASK]s take their candidate: `ancestral_commit`, `topk_commit`, `first_hitting_commit`), so a new proposal
(importance sampling, a joint token + latent step) or a new commit rule plugs in without copying the samplers.
With T steps the NFE budget is T: T - 1 reverse steps, then one argmax pass for what is still masked (semi_ar:
T // blocks per block, each block completed before the next).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dlm_jax.diffusion.masked import subs_logits
from dlm_jax.diffusion.schedules import MaskSchedule
from dlm_jax.errors import UserError
from dlm_jax.sampling.loop import (
    SamplerState,
    SampleSpec,
    argmax_last,
    init_state,
    option,
    run_scan,
    run_while,
    sample_categorical,
)
from dlm_jax.sampling.parallel import (
    PARALLEL_RULES,
    REMASKING_RULES,
    ParallelDecoding,
    ParallelOptions,
    check_parallel_options,
    draw_confidence,
    topk_commit,
)

Array = jax.Array
LogitsFn = Callable[[Array, Array], Array]  # (z [N, L], t [N]) -> logits [N, L, V+1]
# A runner advances the state over the `active` positions [N, L] in `steps` steps.
Runner = Callable[[LogitsFn, SamplerState, Array, int], SamplerState]
RUNNERS = ("ancestral", "cached", "first_hitting", "topk_confidence", *PARALLEL_RULES, *REMASKING_RULES)
TIME_GRIDS = ("linear", "cosine")
UNMASK_SCHEDULES = ("linear", "cosine")


# The options the masked rules share: one definition each, used by every options class that has them (a Field
# object cannot be shared between dataclasses, hence functions).
def inner_option() -> str:
    return option("ancestral", "the masked rule run inside each block", RUNNERS)


def unmask_schedule_option() -> str:
    return option("linear", "topk_confidence: how many tokens stay masked after each step", UNMASK_SCHEDULES)


def time_grid_option() -> str:
    return option("linear", "ancestral / cached: reverse-step times, linear or MD4's cosine grid (small steps near "
                  "t = 1)", TIME_GRIDS)


@dataclasses.dataclass(frozen=True)
class AncestralOptions:
    time_grid: str = time_grid_option()


@dataclasses.dataclass(frozen=True)
class TopkOptions:
    unmask_schedule: str = unmask_schedule_option()


@dataclasses.dataclass(frozen=True)
class SemiARFields:
    block_length: int = option(0, "tokens per block (0: 16, or the whole length if shorter)")
    inner: str = inner_option()
    unmask_schedule: str = unmask_schedule_option()
    time_grid: str = time_grid_option()


@dataclasses.dataclass(frozen=True)
class SemiAROptions(ParallelOptions, SemiARFields):
    """semi_ar's own options, then the parallel rules' (a dataclass lists the later base's fields first)."""


def window_option() -> int:
    return option(0, "context window W (a multiple of the block): each block sees only the W tokens ending at its "
                     "end, positions from 0, so samples may be longer than data.seq_len; 0: the whole sequence")


@dataclasses.dataclass(frozen=True)
class SlidingSemiAROptions(SemiAROptions):
    window: int = window_option()


# -- the two halves of a masked step -------------------------------------------------------------
# A proposal gives x0 candidates for every position; a commit rule picks which masked positions take theirs.
# ProposalFn(rng, logits [N, L, V], tokens [N, L], t) -> x0 [N, L]: the denoiser's draw by default; EDLM swaps in
# importance sampling, a joint token + latent step its own. Commit rules are plain functions of the masks.
ProposalFn = Callable[[Array, Array, Array, Array], Array]


def ancestral_commit(rng: Array, todo: Array, schedule: MaskSchedule, t: Array, s: Array) -> Array:
    """MDLM's reverse step t -> s: each position of `todo` [N, L] commits w.p. (alpha_s - alpha_t) / (1 - alpha_t)."""
    alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
    return todo & (jax.random.uniform(rng, todo.shape) < (alpha_s - alpha_t) / (1.0 - alpha_t))


def first_hitting_commit(rng: Array, todo: Array) -> Array:
    """Exactly one uniformly chosen position of `todo` [N, L] per row commits (none when the row has none)."""
    noise = jnp.where(todo, jax.random.gumbel(rng, todo.shape), -jnp.inf)
    return jax.nn.one_hot(argmax_last(noise), todo.shape[1], dtype=bool) & todo


class MaskedSampling(ParallelDecoding):
    """The settings every masked sampler shares: [MASK] id, schedule, t_eps, the static `SampleSpec`, and the
    proposal (default: x0 ~ p_theta(x0 | z_t) with the spec's temperature and nucleus)."""

    def __init__(self, spec: SampleSpec, mask_id: int, schedule: MaskSchedule, t_eps: float,
                 proposal: ProposalFn | None = None):
        self.spec, self.mask_id, self.schedule, self.t_eps = spec, mask_id, schedule, t_eps
        self.unmask_schedule = spec.option("unmask_schedule", "linear")
        self.time_grid = spec.option("time_grid", "linear")
        self.propose = proposal or self.denoiser_proposal

    # -- shared pieces -------------------------------------------------------------------------
    def denoiser_proposal(self, rng: Array, logits: Array, tokens: Array, t: Array) -> Array:
        del tokens, t
        return sample_categorical(rng, logits, self.spec.temperature, self.spec.top_p)

    def predict(self, logits_fn: LogitsFn, tokens: Array, t: Array) -> Array:
        """SUBS logits of x_0 given z_t; t is a scalar or per-sample [N]."""
        return subs_logits(logits_fn(tokens, jnp.broadcast_to(t, (tokens.shape[0],))), self.mask_id)

    def first_or_predict(self, logits_fn: LogitsFn, tokens: Array, t: Array, primed: Array | None,
                         first: Array) -> tuple[Array, Array]:
        """(SUBS logits, forwards run): on the first step of a primed run the logits of the starting tokens that
        the caller computed already (Fast-dLLM's cache refresh: a t-agnostic model), else `predict`."""
        if primed is None:
            return self.predict(logits_fn, tokens, t), jnp.int32(1)
        logits = jax.lax.cond(first, lambda: subs_logits(primed, self.mask_id),
                              lambda: self.predict(logits_fn, tokens, t))
        return logits, (~first).astype(jnp.int32)

    def grid(self, i: Array, steps: int) -> tuple[Array, Array]:
        """Times (t, s) of reverse step i of `steps` on the grid 1 -> eps: linear, or cosine (MD4, Shi et al.
        2024): the linear grid's fraction u in [0, 1] mapped to cos(pi/2 (1 - u)), then scaled into [eps, 1]."""
        dt = (1.0 - self.t_eps) / max(steps, 1)  # 0 steps: the scan body is traced, never run
        if self.time_grid == "cosine":
            u_t, u_s = 1.0 - i / max(steps, 1), 1.0 - (i + 1) / max(steps, 1)  # linear fractions 1 -> 0
            warp = lambda u: self.t_eps + (1.0 - self.t_eps) * jnp.cos(0.5 * math.pi * (1.0 - u))  # noqa: E731
            return warp(u_t), warp(u_s)
        return 1.0 - i * dt, 1.0 - (i + 1) * dt

    def todo(self, tokens: Array, active: Array) -> Array:
        return (tokens == self.mask_id) & active

    def ancestral_update(self, state: SamplerState, logits: Array, t: Array, s: Array, active: Array) -> SamplerState:
        """Proposal x0, then `ancestral_commit` over the active [MASK]s."""
        rng, rng_x0, rng_unmask = jax.random.split(state.rng, 3)
        x0 = self.propose(rng_x0, logits, state.tokens, t)
        commit = ancestral_commit(rng_unmask, self.todo(state.tokens, active), self.schedule, t, s)
        return state.replace(tokens=jnp.where(commit, x0, state.tokens), rng=rng, step=state.step + 1)

    # -- runners -------------------------------------------------------------------------------
    # Each runner(logits_fn, state, active, steps, primed=None) denoises the active [MASK]s of state.tokens;
    # `primed` ([N, L, V] raw logits of state.tokens, computed by the caller) replaces the first forward.
    def ancestral(self, logits_fn: LogitsFn, state: SamplerState, active: Array, steps: int,
                  primed: Array | None = None) -> SamplerState:
        def step(st: SamplerState, i: Array) -> SamplerState:
            t, s = self.grid(i, steps)
            logits, forwards = self.first_or_predict(logits_fn, st.tokens, t, primed, i == 0)
            st = self.ancestral_update(st, logits, t, s, active)
            return st.replace(nfe=st.nfe + forwards)

        return run_scan(step, state, steps)

    def cached(self, logits_fn: LogitsFn, state: SamplerState, active: Array, steps: int,
               primed: Array | None = None) -> SamplerState:
        """Ancestral with the last prediction reused while the tokens are unchanged (needs a t-agnostic model).

        state.cache = {"logits": [N, L, V], "stale": bool}: stale when the tokens changed since `logits`.
        """
        if primed is not None:
            state = state.replace(cache={"logits": subs_logits(primed, self.mask_id), "stale": jnp.asarray(False)})

        def step(st: SamplerState, i: Array) -> SamplerState:
            t, s = self.grid(i, steps)
            logits = jax.lax.cond(st.cache["stale"], lambda: self.predict(logits_fn, st.tokens, t),
                                  lambda: st.cache["logits"])
            new = self.ancestral_update(st, logits, t, s, active)
            changed = jnp.any(new.tokens != st.tokens)
            return new.replace(nfe=st.nfe + st.cache["stale"].astype(jnp.int32),
                               cache={"logits": logits, "stale": changed})

        return run_scan(step, state, steps)

    def first_hitting(self, logits_fn: LogitsFn, state: SamplerState, active: Array, steps: int,
                      primed: Array | None = None) -> SamplerState:
        """One token per forward, at the first-hitting time of n masked tokens: 1 - alpha_s = (1 - alpha_t) u^(1/n).

        `steps` is not used: the loop runs until no active [MASK] is left. state.cache = per-sample t [N].
        """
        del steps
        n_samples = state.tokens.shape[0]
        first_step = state.step

        def step(st: SamplerState) -> SamplerState:
            rng, rng_u, rng_pos, rng_x0 = jax.random.split(st.rng, 4)
            todo = self.todo(st.tokens, active)
            n = todo.sum(-1)  # [N]
            t = st.cache
            u = jax.random.uniform(rng_u, (n_samples,), minval=1e-12)
            mask_rate = (1.0 - self.schedule.alpha(t)) * u ** (1.0 / jnp.maximum(n, 1))
            s = self.schedule.time_at_mask_rate(mask_rate)
            logits, forwards = self.first_or_predict(logits_fn, st.tokens, s, primed, st.step == first_step)
            x0 = self.propose(rng_x0, logits, st.tokens, s)
            chosen = first_hitting_commit(rng_pos, todo)
            return st.replace(tokens=jnp.where(chosen, x0, st.tokens), rng=rng, step=st.step + 1,
                              nfe=st.nfe + forwards, cache=jnp.where(n > 0, s, t))

        state = state.replace(cache=jnp.ones((n_samples,), jnp.float32))
        return run_while(step, state, lambda st: jnp.any(self.todo(st.tokens, active)))

    def topk_confidence(self, logits_fn: LogitsFn, state: SamplerState, active: Array, steps: int,
                        primed: Array | None = None) -> SamplerState:
        """Per step, commit the k most confident predictions (prob of the drawn token); k keeps
        floor(m0 * f(i+1)) tokens masked, f linear (1 - r) or cosine (cos(pi r / 2)), so all are done at the end."""
        m0 = self.todo(state.tokens, active).sum(-1)  # [N]

        def step(st: SamplerState, i: Array) -> SamplerState:
            t = 1.0 - i / steps
            logits, forwards = self.first_or_predict(logits_fn, st.tokens, t, primed, i == 0)
            st = self.topk_update(st, logits, t, m0, i, steps, active)
            return st.replace(nfe=st.nfe + forwards)

        return run_scan(step, state, steps)

    def keep_masked(self, m0: Array, i: Array, steps: int) -> Array:
        """How many of the m0 [N] masked tokens stay masked after step i of `steps` (`unmask_schedule` f: linear
        1 - r, or cosine cos(pi r / 2), floored; none after the last step)."""
        if self.unmask_schedule == "cosine":
            keep = jnp.floor(m0 * jnp.cos(0.5 * math.pi * (i + 1.0) / steps) + 1e-4).astype(jnp.int32)
        else:  # exact integer floor(m0 (1 - (i + 1) / T))
            keep = (m0 * (steps - 1 - i)) // steps
        return jnp.where(i >= steps - 1, 0, keep)

    def topk_update(self, state: SamplerState, logits: Array, t: Array, m0: Array, i: Array, steps: int,
                    active: Array) -> SamplerState:
        """Step i of `steps` of topk_confidence: proposal x0, then the k most confident [MASK]s commit, k leaving
        `keep_masked` of the m0 [N] there were at the start."""
        rng, rng_x0 = jax.random.split(state.rng)
        todo = self.todo(state.tokens, active)
        x0 = self.propose(rng_x0, logits, state.tokens, t)
        commit = topk_commit(draw_confidence(logits, x0), todo, todo.sum(-1) - self.keep_masked(m0, i, steps))
        return state.replace(tokens=jnp.where(commit, x0, state.tokens), rng=rng, step=state.step + 1)

    def final_argmax(self, logits_fn: LogitsFn, state: SamplerState, active: Array | None = None) -> SamplerState:
        """Noise removal: [MASK]s left (in `active`) after the reverse steps take the argmax of one more forward
        (skipped with `lax.cond` when none is left; the cached sampler reuses its prediction while fresh)."""
        remaining = state.tokens == self.mask_id
        if active is not None:
            remaining &= active
        any_left = jnp.any(remaining)
        cached = isinstance(state.cache, dict) and "stale" in state.cache
        need_forward = any_left & state.cache["stale"] if cached else any_left

        def forward() -> Array:
            return self.predict(logits_fn, state.tokens, jnp.zeros(()))

        def fill() -> Array:
            logits = jax.lax.cond(state.cache["stale"], forward, lambda: state.cache["logits"]) if cached else forward()
            return jnp.where(remaining, argmax_last(logits), state.tokens)

        tokens = jax.lax.cond(any_left, fill, lambda: state.tokens)
        state = state.replace(tokens=tokens, nfe=state.nfe + need_forward.astype(jnp.int32))
        if cached:  # the fill changed the tokens: the cached logits no longer match them (semi_ar's next block)
            state = state.replace(cache={**state.cache, "stale": state.cache["stale"] | any_left})
        return state


def check_runner(spec: SampleSpec, time_conditioned: bool) -> None:
    """One-line errors for the masked rule a spec runs if it cannot (unknown, `cached` on a time-conditioned model,
    a parallel rule's knob out of range)."""
    name = inner_rule(spec)
    check_parallel_options(spec)
    if name not in RUNNERS:
        raise UserError(f"unknown masked-diffusion rule {name!r}; choose one of {', '.join(RUNNERS)}")
    if name == "cached" and time_conditioned:
        raise UserError("the cached sampler reuses predictions across t: it needs a model trained with "
                        "model.time_conditioning=False; use --sampler=ancestral")


def check_blocks(sampler: str, length: int, block: int, steps: int, what: str = "block length") -> None:
    """Blocks of `block` tokens must tile the length, and the step budget must split evenly over the blocks (a
    remainder would be dropped silently)."""
    if length % block:
        raise UserError(f"{sampler}: length {length} is not divisible by the {what} {block}")
    num_blocks = length // block
    if steps < num_blocks:
        raise UserError(f"{sampler}: steps={steps} is fewer than the {num_blocks} blocks")
    if steps % num_blocks:
        raise UserError(f"{sampler}: steps={steps} does not split over the {num_blocks} blocks; use a multiple of "
                        f"{num_blocks} (e.g. --steps={num_blocks * max(1, round(steps / num_blocks))})")


def check_spec(spec: SampleSpec, time_conditioned: bool, seq_len: int | None = None) -> None:
    """One-line errors for settings a masked sampler (a rule, or semi_ar around one) cannot run with; with the
    model's `seq_len`, also its length and context window (`check_window`)."""
    check_runner(spec, time_conditioned)
    if spec.sampler == "semi_ar":
        check_blocks("semi_ar", spec.length, semi_ar_block_length(spec), spec.steps)
    if seq_len is not None:
        check_window(spec, semi_ar_block_length(spec), seq_len)


def check_window(spec: SampleSpec, block: int, seq_len: int) -> None:
    """A context window fits the model (<= data.seq_len) and holds whole blocks; without one, the sample does."""
    window = spec.option("window", 0)
    if window < 0 or window % block or window > seq_len:
        raise UserError(f"--sampler.window={window} must be a multiple of the block ({block}) and at most the "
                        f"model's data.seq_len={seq_len} (0: no window)")
    if not window and spec.length > seq_len:
        raise UserError(f"the model was trained on data.seq_len={seq_len} tokens; cannot sample {spec.length} "
                        f"(lower --length, or slide a context window: --sampler=semi_ar / block_nocache with "
                        f"--sampler.window={seq_len - seq_len % block})")


def inner_rule(spec: SampleSpec) -> str:
    """The masked rule a spec runs: its `inner` option (semi_ar, block, Fast-dLLM caches) or the sampler itself."""
    return spec.option("inner", spec.sampler)


def initial_cache(runner: str, n: int, length: int, vocab: int) -> Any:
    """The `SamplerState.cache` a runner starts from (its structure must not change inside a scan)."""
    if runner == "cached":
        return {"logits": jnp.zeros((n, length, vocab), jnp.float32), "stale": jnp.array(True)}
    if runner == "first_hitting":
        return jnp.ones((n,), jnp.float32)  # per-sample time, reset to 1 by every first_hitting run
    return None


def reverse_steps(runner: str, budget: int) -> int:
    """Reverse steps a runner takes within a budget of `budget` forwards: the ancestral rules leave the last
    forward to the argmax pass (T - 1 steps on the grid 1 -> eps); the others finish every token themselves."""
    return max(budget - 1, 0) if runner in ("ancestral", "cached") else budget


def semi_ar_block_length(spec: SampleSpec) -> int:
    return spec.option("block_length", 0) or min(16, spec.length)


def sample(logits_fn: LogitsFn, rng: Array, template: Array, spec: SampleSpec, *, mask_id: int,
           schedule: MaskSchedule, t_eps: float = 1e-3,
           proposal: ProposalFn | None = None) -> tuple[Array, dict[str, Array]]:
    """Draws `spec.num_samples` sequences from the template [L] ([MASK] = to generate; others kept).

    Returns (tokens [N, L] int32, {"nfe": scalar}).
    """
    ms = MaskedSampling(spec, mask_id, schedule, t_eps, proposal)
    tokens = jnp.broadcast_to(template.astype(jnp.int32), (spec.num_samples, template.shape[0]))
    n, length = tokens.shape
    inner = inner_rule(spec)
    runner: Runner = ms.runner(inner)
    state = init_state(tokens, rng, initial_cache(inner, n, length, mask_id + 1))
    if spec.sampler == "semi_ar":
        block = semi_ar_block_length(spec)
        num_blocks = length // block
        positions = jnp.arange(length)

        def block_body(st: SamplerState, b: Array) -> tuple[SamplerState, None]:
            active = jnp.broadcast_to((positions >= b * block) & (positions < (b + 1) * block), (n, length))
            st = runner(logits_fn, st, active, reverse_steps(inner, spec.steps // num_blocks))
            return ms.final_argmax(logits_fn, st, active), None  # a block is complete before the next starts

        state = jax.lax.scan(block_body, state, jnp.arange(num_blocks))[0]
    else:
        state = runner(logits_fn, state, jnp.ones((n, length), bool), reverse_steps(inner, spec.steps))
    state = ms.final_argmax(logits_fn, state)
    return state.tokens, {"nfe": state.nfe}
