"""Parallel decoding rules (sampling/parallel.py): the commit rules on hand-made confidences, and every rule as
the inner rule of semi_ar: known tokens fixed, no [MASK] left, >= 1 commit per forward, the one-token-per-step
decoder when its threshold accepts only the top-1, fewer forwards on a confident model, RCR's and Saber's
re-masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.diffusion.schedules import MaskSchedule
from dlm_jax.errors import UserError
from dlm_jax.sampling import masked, parallel
from dlm_jax.sampling.loop import SampleSpec

V, MASK = 6, 6
W = 2.0 * jax.random.normal(jax.random.PRNGKey(7), (V + 1, V + 1))
RULES = ("threshold", "factor", "prophet", "sched", "ccd", "saber", "rcr")
# settings under which each rule commits nothing beyond its floor (the top-1 per step)
TOP1_ONLY = {"threshold": {"min_confidence": 1.1}, "factor": {"factor": 0.0}, "prophet": {"gap": float("inf")},
             "sched": {"gap": float("inf"), "gap_end": float("inf")}, "ccd": {"stable_steps": 10**6}}


def bigram_logits(z, t):
    """A t-agnostic toy denoiser: each position's logits depend on its own token and its left neighbour's."""
    del t
    left = jnp.concatenate([jnp.full((z.shape[0], 1), MASK), z[:, :-1]], axis=1)
    return W[z] + W[left][..., ::-1]


def _sample(inner, template, steps, n=2, fn=bigram_logits, seed=0, temperature=1.0, block_length=8, **options):
    spec = SampleSpec("semi_ar", n, template.shape[0], steps=steps, temperature=temperature,
                      options=masked.SemiAROptions(block_length=block_length, inner=inner, **options))
    masked.check_spec(spec, time_conditioned=False)
    run = jax.jit(lambda rng: masked.sample(fn, rng, template, spec, mask_id=MASK, schedule=MaskSchedule("linear")))
    tokens, stats = run(jax.random.PRNGKey(seed))
    return np.asarray(tokens), int(stats["nfe"])


def test_factor_rule_commits_the_longest_prefix_that_fits():
    confidence = jnp.array([[0.5, 0.99, 0.8, 0.9, 0.97]])
    todo = jnp.array([[True, True, True, True, False]])
    # sorted todo: 0.99 (2 * 0.01), 0.9 (3 * 0.1), 0.8 (4 * 0.2 = 0.8 <= 1), 0.5 (5 * 0.5 > 1): three commit
    np.testing.assert_array_equal(parallel.factor_commit(confidence, todo, 1.0), [[False, True, True, True, False]])
    np.testing.assert_array_equal(parallel.factor_commit(confidence, todo, 0.25), [[False, True, False, False, False]])
    above = parallel.threshold_commit(confidence, todo, 0.85)
    np.testing.assert_array_equal(above, [[False, True, False, True, False]])


def test_gap_thresholds_and_fill_all():
    progress = jnp.array([0.0, 0.5, 0.9])
    np.testing.assert_allclose(parallel.prophet_threshold(progress, 7.5), [7.5, 5.0, 2.5])
    np.testing.assert_allclose(parallel.sched_threshold(progress, 7.5, 2.5), [7.5, 5.0, 3.0])
    logits = jnp.array([[[9.0, 1.0, 0.0], [4.0, 0.0, 3.0]]])  # gaps 8 and 1
    gap = parallel.top_gap(logits)
    np.testing.assert_allclose(gap, [[8.0, 1.0]])
    todo = jnp.array([[True, True]])
    assert not parallel.fill_all_commit(gap, todo, jnp.array([5.0])).any()  # mean gap 4.5 < 5
    assert parallel.fill_all_commit(gap, jnp.array([[True, False]]), jnp.array([5.0]))[0, 0]  # mean over todo: 8
    streak = parallel.stable_streak(jnp.array([1, 2]), jnp.array([1, 3]), jnp.array([2, 5]))
    np.testing.assert_array_equal(streak, [3, 1])


@pytest.mark.parametrize("inner", RULES)
def test_rules_keep_known_tokens_and_leave_no_mask(inner):
    template = jnp.full((16,), MASK).at[:3].set(jnp.array([1, 2, 3])).at[9:11].set(jnp.array([4, 0]))
    tokens, nfe = _sample(inner, template, steps=16)
    known = np.asarray(template) != MASK
    np.testing.assert_array_equal(tokens[:, known], np.broadcast_to(np.asarray(template)[known], (2, known.sum())))
    assert not (tokens == MASK).any() and tokens.max() < V
    assert 1 <= nfe <= 16


@pytest.mark.parametrize("inner", RULES[:-1])  # net: Saber re-masks fewer than it commits
def test_every_forward_commits_at_least_one_token(inner):
    seen = []

    def recording(z, t):
        jax.debug.callback(lambda c: seen.append(int(c)), jnp.sum(z[0] == MASK))
        return bigram_logits(z, t)

    _sample(inner, jnp.full((8,), MASK), steps=8, n=1, fn=recording)
    jax.effects_barrier()
    assert seen[0] == 8 and all(b < a for a, b in zip(seen, seen[1:], strict=False)), seen


@pytest.mark.parametrize("inner", sorted(TOP1_ONLY))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_top1_only_threshold_equals_one_token_per_step(inner, temperature):
    template = jnp.full((16,), MASK)
    reference, nfe_ref = _sample("topk_confidence", template, steps=16, temperature=temperature)
    tokens, nfe = _sample(inner, template, steps=16, temperature=temperature, **TOP1_ONLY[inner])
    np.testing.assert_array_equal(tokens, reference)
    assert nfe == nfe_ref == 16  # one forward per masked token


def test_threshold_cuts_forwards_on_a_confident_model():
    def confident(z, t):  # every [MASK] is token 3 with probability ~1
        del t
        return jnp.broadcast_to(20.0 * jax.nn.one_hot(3, V + 1), z.shape + (V + 1,))

    tokens, nfe = _sample("threshold", jnp.full((16,), MASK), steps=16, fn=confident, temperature=0.0)
    assert (tokens == 3).all() and nfe == 2  # one forward per block of 8
    _, nfe_loose = _sample("threshold", jnp.full((16,), MASK), steps=16, min_confidence=1.1, fn=confident)
    assert nfe_loose == 16


def _turncoat_model(seen):
    """A toy denoiser that records the first row it is given (in `seen`): with everything masked only position 0 is
    (weakly, p = 0.6 over token 1) confident; once anything is unmasked every position is sure of token 4."""

    def model(z, t):
        del t
        jax.debug.callback(lambda row: seen.append(np.asarray(row)), z[0])
        all_masked = jnp.all(z == MASK, axis=-1, keepdims=True)[..., None]  # [N, 1, 1]
        first = jnp.zeros(z.shape + (V + 1,)).at[:, 0, 1].set(2.0)
        sure = jnp.broadcast_to(20.0 * jax.nn.one_hot(4, V + 1), z.shape + (V + 1,))
        return jnp.where(all_masked, first, sure)

    return model


def test_rcr_remasks_a_committed_token_pushed_out_of_the_budget():
    """All masked: position 0 is the only (weakly) confident one and commits; from then on the other positions are
    near-certain, so at the next step they outrank position 0's commit-time confidence and it is re-masked."""
    seen = []
    model = _turncoat_model(seen)

    tokens, nfe = _sample("rcr", jnp.full((4,), MASK), steps=4, n=1, fn=model, temperature=0.0, block_length=4)
    jax.effects_barrier()
    assert nfe == 4 and not (tokens == MASK).any()
    assert seen[1][0] == 1 and (seen[1][1:] == MASK).all()  # after step 0: position 0 committed
    assert seen[2][0] == MASK and (seen[2] != MASK).sum() == 2  # after step 1: re-masked, two others in its place


def test_backtrack_remask_takes_the_largest_drops_above_the_minimum():
    drop = jnp.array([[0.5, -jnp.inf, 0.9, 0.2, 0.7], [0.5, 0.6, 0.1, 0.0, 0.0]])
    np.testing.assert_array_equal(parallel.backtrack_remask(drop, jnp.array([2, 3]), 0.3),
                                  [[False, False, True, False, True], [True, True, False, False, False]])
    assert not parallel.backtrack_remask(drop, jnp.array([0, 0]), 0.3).any()


def test_saber_remasks_a_token_the_model_turned_against_and_commits_above_the_mean():
    """All masked: position 0 alone is (weakly, p = 0.6) confident and commits. Next forward: every position is
    sure of token 4, so position 0's token 1 fell from 0.6 to ~0 and is re-masked, while all three [MASK]s pass
    the mean commit confidence (0.6) and commit at once; one more forward fills position 0."""
    seen = []
    model = _turncoat_model(seen)

    tokens, nfe = _sample("saber", jnp.full((4,), MASK), steps=4, n=1, fn=model, temperature=0.0, block_length=4)
    jax.effects_barrier()
    np.testing.assert_array_equal(seen[1], [1, MASK, MASK, MASK])
    np.testing.assert_array_equal(seen[2], [MASK, 4, 4, 4])
    assert nfe == 3 and (tokens == 4).all()
    # min_drop above any fall: no backtracking, position 0 keeps its token
    seen.clear()
    tokens, nfe = _sample("saber", jnp.full((4,), MASK), steps=4, n=1, fn=model, temperature=0.0, block_length=4,
                          min_drop=1.0)
    np.testing.assert_array_equal(tokens, [[1, 4, 4, 4]])
    assert nfe == 2


@pytest.mark.parametrize("option", [{"remask": -1}, {"stable_steps": 0}, {"min_drop": -0.5}])
def test_knobs_below_their_range_are_one_line_errors(option):
    spec = SampleSpec("semi_ar", 1, 8, steps=8, options=masked.SemiAROptions(inner="saber", **option))
    with pytest.raises(UserError, match=f"--sampler.{next(iter(option))}=.* must be >="):
        masked.check_spec(spec, time_conditioned=False)
