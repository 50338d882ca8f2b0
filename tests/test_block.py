"""Block diffusion: L' = L is MDLM, L' = 1 is AR, clipped antithetic rates, exact KV-cached block decoding
(== decoding without the cache), Fast-dLLM approximate caches, and the family end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import config as config_lib
from dlm_jax import families
from dlm_jax.diffusion import block, masked
from dlm_jax.diffusion.schedules import MaskSchedule
from dlm_jax.errors import UserError
from dlm_jax.sampling import block as block_sampling
from dlm_jax.sampling import masked as masked_sampling
from dlm_jax.sampling.loop import SampleSpec
from tests.helpers import StubTokenizer

VOCAB = 13  # 12 tokens + [MASK]
MASK = VOCAB - 1


def _model(family, block_size, seed=0):
    c = families.base_config()
    c.model.family = family
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 32, 4, 64
    c.block.block_size = block_size
    fam = families.get(family)(c, StubTokenizer(VOCAB - 1, eos_id=0), {})
    params = fam.model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16), jnp.int32), jnp.ones((1,)))["params"]
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), params)
    return c, fam, fam.model, params


def _x0(batch=2, length=16, seed=3):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, VOCAB - 1)


def test_block_size_L_is_mdlm():
    """One block: noisy tokens see the whole noisy sequence and no clean token, exactly MDLM's forward."""
    _, _, model, params = _model("block", block_size=16)
    x0, mask = _x0(), jnp.ones((2, 16))
    rates = jnp.array([[0.3], [0.8]])
    rng = jax.random.PRNGKey(7)
    logits_fn = lambda tokens, positions: model.apply({"params": params}, tokens, positions=positions)  # noqa: E731
    got = block.nelbo_terms_at(logits_fn, x0, mask, rates, rng, MaskSchedule("linear"), 16, MASK)
    want = masked.nelbo_terms_at(lambda z, t: model.apply({"params": params}, z, mask_mode="full"), x0, mask,
                                 rates[:, 0], rng, MaskSchedule("linear"), 0, MASK)
    np.testing.assert_allclose(got["nll_sum"], want["nll_sum"], rtol=1e-5)
    np.testing.assert_allclose(got["per_block"].sum(), want["nll_sum"] / 16, rtol=1e-5)  # per loss token


def test_block_size_1_is_autoregressive():
    """L' = 1: the prediction of token i depends on x_{<i} only (an AR model), and with every token masked
    (rate 1, weight 1) the NELBO is exactly the sum of those next-token cross-entropies."""
    _, _, model, params = _model("block", block_size=1)
    x0 = _x0(batch=1)

    def noisy_logits(x):
        z = jnp.full_like(x, MASK)
        positions = jnp.concatenate([jnp.arange(16), jnp.arange(16)])
        return model.apply({"params": params}, jnp.concatenate([z, x], axis=1), positions=positions)[:, :16]

    base = noisy_logits(x0)
    changed = noisy_logits(x0.at[:, 9:].set((x0[:, 9:] + 1) % (VOCAB - 1)))
    np.testing.assert_allclose(changed[:, :10], base[:, :10], atol=1e-5)  # positions <= 9 never see x_{>=9}
    assert not np.allclose(changed[:, 10:], base[:, 10:], atol=1e-3)
    logits_fn = lambda tokens, positions: model.apply({"params": params}, tokens, positions=positions)  # noqa: E731
    terms = block.nelbo_terms_at(logits_fn, x0, jnp.ones((1, 16)), jnp.ones((1, 16)), jax.random.PRNGKey(0),
                                 MaskSchedule("linear"), 1, MASK)
    log_probs = jax.nn.log_softmax(masked.subs_logits(base, MASK), axis=-1)
    ce = -jnp.take_along_axis(log_probs, x0[..., None], axis=-1).sum()
    np.testing.assert_allclose(terms["nll_sum"], ce, rtol=1e-5)


def test_clipped_antithetic_rates_cover_the_interval():
    rates = np.sort(np.asarray(block.block_mask_rates(jax.random.PRNGKey(0), 4, 8, 0.45, 0.95)).ravel())
    assert rates.min() >= 0.45 and rates.max() <= 0.95
    np.testing.assert_allclose(np.diff(rates), 0.5 / 32, rtol=1e-4)


def test_clip_search_grid_is_bd3lms():
    """(eps, 1), then widths 0.5 .. 0.9 (step 0.05) slid over [0, 1] in steps of 0.05: 11 + 10 + ... + 3 = 63."""
    grid = block.clip_search_grid(1e-3)
    assert grid[0] == (1e-3, 1.0) and len(grid) == 64 and len(set(grid)) == 64
    assert (1e-3, 0.5) in grid and (0.5, 1.0) in grid and (0.45, 0.95) in grid and (0.1, 1.0) in grid
    widths = sorted({round(o - b, 6) for b, o in grid[1:] if b > 1e-3})
    assert widths == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
    assert all(1e-3 <= b < o <= 1.0 for b, o in grid)


def test_per_block_losses_and_their_variance():
    """per_block = each block's weighted loss over its loss tokens; blocks without one are NaN and left out."""
    x0, mask = _x0(), jnp.ones((2, 16)).at[1, 8:].set(0.0)  # row 1: blocks 2 and 3 are padding
    rates = jnp.full((2, 4), 0.5)
    nll = lambda tokens, positions: jnp.zeros(tokens.shape + (VOCAB,))  # noqa: E731 -- uniform logits
    got = block.nelbo_terms_at(nll, x0, mask, rates, jax.random.PRNGKey(1), MaskSchedule("linear"), 4, MASK)
    per_block = np.asarray(got["per_block"])
    assert np.isnan(per_block[1, 2:]).all() and not np.isnan(per_block[:, :2]).any()
    np.testing.assert_allclose(np.nansum(per_block * 4), got["nll_sum"], rtol=1e-5)  # 4 loss tokens per real block
    best, variances = block.best_clip({(0.1, 0.9): per_block, (0.3, 0.8): np.zeros_like(per_block)})
    assert best == (0.3, 0.8) and variances["0.1-0.9"] == pytest.approx(float(np.nanvar(per_block)))


def test_variance_search_picks_the_lowest_variance_candidate():
    best, variances = block.best_clip({(0.1, 0.9): np.array([1.0, 3.0]), (0.3, 0.8): np.array([2.0, 2.1])})
    assert best == (0.3, 0.8) and variances["0.1-0.9"] == pytest.approx(1.0)


def _sample(fam, params, sampler, template, steps, seed=0, **options):
    spec = SampleSpec(sampler, 3, len(template), steps=steps, options=fam.sampler(sampler).options(**options))
    fam.check_sample(spec, template)
    run = jax.jit(lambda rng: fam.sample(params, rng, spec, template))
    tokens, stats = run(jax.random.PRNGKey(seed))
    return np.asarray(tokens), int(stats["nfe"])


@pytest.mark.parametrize("inner", ["ancestral", "topk_confidence", "cached", "threshold", "rcr", "saber"])
def test_kv_cached_block_decoding_equals_decoding_without_the_cache(inner):
    _, fam, _, params = _model("block", block_size=4)
    template = np.array([3, 1, 4, 1, 5] + [-1] * 11, np.int32)
    cached, nfe_cached = _sample(fam, params, "block", template, 16, inner=inner)
    plain, nfe_plain = _sample(fam, params, "block_nocache", template, 16, inner=inner)
    np.testing.assert_array_equal(cached, plain)
    np.testing.assert_array_equal(cached[:, :5], np.broadcast_to(template[:5], (3, 5)))
    assert not (cached == MASK).any()
    assert nfe_cached <= nfe_plain + 3  # + one K/V-writing forward per finished block (not after the last)


def test_fast_dllm_caches_fill_blocks_and_reduce_to_the_exact_sampler_with_one_block():
    _, fam, _, params = _model("mdlm", block_size=1)
    template = np.array([2, 7] + [-1] * 14, np.int32)
    for sampler in ("prefix_cache", "dual_cache", "dkv_cache"):
        tokens, _ = _sample(fam, params, sampler, template, 16, block_length=4)
        assert not (tokens == MASK).any() and (tokens[:, :2] == [2, 7]).all()
    # one block: no prefix, no suffix, nothing stale -> exactly semi_ar with one block, in as many forwards (the
    # refresh forward is the first step)
    exact, nfe_exact = _sample(fam, params, "semi_ar", template, 8, block_length=16)
    for sampler in ("prefix_cache", "dual_cache", "dkv_cache"):
        tokens, nfe = _sample(fam, params, sampler, template, 8, block_length=16)
        np.testing.assert_array_equal(tokens, exact)
        assert nfe == nfe_exact


def test_dkv_cache_refreshing_every_block_is_the_prefix_cache_and_its_delayed_forward_starts_a_block_early():
    _, fam, _, params = _model("mdlm", block_size=1)
    template = np.array([2, 7] + [-1] * 14, np.int32)
    # refresh every block; two blocks (block 1's delayed forward runs from position 0: a full refresh)
    for block_length, refresh_every in ((4, 1), (8, 0)):
        prefix, nfe_prefix = _sample(fam, params, "prefix_cache", template, 16, block_length=block_length)
        tokens, nfe = _sample(fam, params, "dkv_cache", template, 16, block_length=block_length,
                              refresh_every=refresh_every)
        np.testing.assert_array_equal(tokens, prefix)
        assert nfe == nfe_prefix


TOY_MASK = 6


def _mask_counting_decode(z, t, cache, index, valid=None):
    """A toy cached model that shows staleness: each forward writes, as the K/V of its positions, how many [MASK]s
    it saw, and predicts (sum of the cached entries before its queries) mod 6 at every query."""
    del t, valid
    n, length = z.shape
    seen = jnp.broadcast_to((z == TOY_MASK).sum(-1, keepdims=True), (n, length)).astype(jnp.float32)
    written = jax.lax.dynamic_update_slice(cache, seen, (0, index))
    read = jnp.where(jnp.arange(cache.shape[1]) < index, cache, 0.0).sum(-1).astype(jnp.int32)  # [N]
    logits = 10.0 * jax.nn.one_hot(read % 6, TOY_MASK + 1)[:, None, :]
    return jnp.broadcast_to(logits, (n, length, TOY_MASK + 1)), written


@pytest.mark.parametrize("refresh_every,expected", [(0, [0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0]),
                                                    (1, [0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 0, 0, 0, 0])])
def test_dkv_cache_reads_a_finished_block_from_the_next_blocks_first_forward(refresh_every, expected):
    """Blocks of 4 over 16 [MASK]s, one commit per forward (the first from the block's first forward). No refresh:
    block 1's first forward (queries from 0, 12 [MASK]s seen) caches block 0, block 2's (from 4, 8 seen) block 1,
    block 3's (from 8, 4 seen) block 2: block 2 starts on 4 x 12 = 48 -> 0, then reads 48 + 4 x 8 = 80 -> 2; block 3
    starts on 80 -> 2, then 96 -> 0. Refreshed every block (= prefix_cache): each block starts on a full forward
    (nothing before position 0: 0), then block 2 reads 8 x 8 = 64 -> 4, block 3 12 x 4 = 48 -> 0."""
    options = block_sampling.DelayedCacheOptions(block_length=4, inner="topk_confidence", refresh_every=refresh_every)
    spec = SampleSpec("dkv_cache", 1, 16, steps=16, temperature=0.0, options=options)
    ms = masked_sampling.MaskedSampling(spec, TOY_MASK, MaskSchedule("linear"), 1e-3)
    run = jax.jit(lambda rng, mode: block_sampling.approx_cache_sample(
        _mask_counting_decode, lambda n: jnp.zeros((1, n)), rng, jnp.full((16,), TOY_MASK), spec, ms, 4, mode),
        static_argnums=1)
    tokens, stats = run(jax.random.PRNGKey(0), "dkv")
    np.testing.assert_array_equal(tokens, [expected])
    assert int(stats["nfe"]) == 16
    if refresh_every == 1:
        np.testing.assert_array_equal(run(jax.random.PRNGKey(0), "prefix")[0], tokens)


@pytest.mark.parametrize("inner", ["ancestral", "cached", "topk_confidence", "first_hitting", "factor"])
def test_fast_dllm_refresh_forward_is_the_first_step(inner):
    """Per block: the refresh forward + (steps - 1) forwards, the count of exact semi-AR decoding (top-k commits
    every token by the last step, so no argmax pass; first-hitting runs one forward per token either way)."""
    _, fam, _, params = _model("mdlm", block_size=1)
    template = np.full(16, -1, np.int32)
    _, nfe_exact = _sample(fam, params, "semi_ar", template, 16, block_length=4, inner="topk_confidence")
    assert nfe_exact == 16
    for sampler in ("prefix_cache", "dual_cache", "dkv_cache"):
        tokens, nfe = _sample(fam, params, sampler, template, 16, block_length=4, inner=inner)
        assert not (tokens == MASK).any()
        if inner == "factor":  # a parallel rule: at most the schedule's forwards, often fewer
            assert nfe <= 4 + 16 - 4
        elif inner in ("topk_confidence", "first_hitting"):
            assert nfe == 4 + 16 - 4  # 4 refreshes + 16 steps or tokens, of which 4 (one per block) were refreshes
        else:  # ancestral / cached: at most steps per block, + an argmax pass where [MASK]s are left
            assert nfe <= 4 * 4 + 4


def test_block_config_errors():
    c = config_lib.apply_overrides(families.base_config(), ["--config.model.family=block",
                                                               "--config.block.block_size=5"])
    with pytest.raises(UserError, match="data.seq_len=128 is not divisible by block.block_size=5"):
        families.validate(c)
    _, fam, _, _ = _model("block", block_size=4)
    with pytest.raises(UserError, match="not divisible by the block size 4"):
        fam.check_sample(SampleSpec("block", 1, 10, steps=8), np.full(10, -1))
    with pytest.raises(UserError, match="unknown sampler 'ancestral' for a block model"):
        fam.check_sample(SampleSpec("ancestral", 1, 8), np.full(8, -1))
    with pytest.raises(UserError, match=r"steps=10 does not split over the 4 blocks; .* \(e.g. --steps=8\)"):
        fam.check_sample(SampleSpec("block", 1, 16, steps=10), np.full(16, -1))  # was: 2 steps silently dropped


def test_fast_dllm_caches_refuse_time_conditioned_models():
    c = families.base_config()
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 1, 32, 4, 64
    c.model.time_conditioning = True
    fam = families.get("mdlm")(c, StubTokenizer(VOCAB - 1), {})
    for sampler in ("prefix_cache", "dual_cache"):
        with pytest.raises(UserError, match=f"{sampler} reuses K/V .*model.time_conditioning=False"):
            fam.check_sample(SampleSpec(sampler, 1, 16, steps=16), np.full(16, -1))
    fam.check_sample(SampleSpec("semi_ar", 1, 16, steps=16), np.full(16, -1))  # recomputes K/V: fine


def test_block_family_through_the_cli(tmp_path):
    """train -> eval (NELBO with U[1e-3, 1] + the clipped-schedule variance search) -> sample with the KV cache."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT, small_corpus

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "dlm_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    workdir = str(tmp_path / "block")
    run("train", "--config=configs/shakespeare_block.py", f"--workdir={workdir}",
        f"--config.data.path={small_corpus(tmp_path)}", "--config.model.num_layers=2", "--config.model.d_model=32",
        "--config.model.num_heads=2", "--config.model.mlp_dim=64", "--config.data.seq_len=32",
        "--config.train.batch_size=8", "--config.eval.batch_size=8", "--config.train.num_steps=2",
        "--config.train.eval_every=0", "--config.eval.num_batches=2")
    result = run("eval", f"--workdir={workdir}")
    assert result["metric"] == "nelbo" and 0 < result["nelbo"] < 10
    assert 0 < result["clip_best_beta"] < result["clip_best_omega"] <= 1 and len(result["clip_variances"]) == 64
    stats = run("sample", f"--workdir={workdir}", "--sampler=block", "--steps=8", "--length=16", "--num_samples=2")
    assert stats["sampler"] == "block" and stats["length"] == 16 and stats["nfe"] >= 1
    stats = run("sample", f"--workdir={workdir}", "--sampler=block", "--steps=8", "--length=16", "--num_samples=2",
                "--sampler.stop_at_eos=true", "--sampler.entropy_stop=4")  # variable length (BD3-LM's rules)
    assert 0 <= stats["mean_length"] <= 16 and stats["nfe"] >= 1


@pytest.mark.parametrize("schedule", [MaskSchedule("linear"), MaskSchedule("cosine"), MaskSchedule("poly", 2.0)])
def test_block_nelbo_of_the_true_marginal_model_is_its_cross_entropy_for_every_schedule(schedule):
    """A context-free model that outputs the true marginals p: E_r[(1/r) sum_masked -log p(x)] = sum -log p(x)
    for r ~ U[eps, 1], whatever the schedule (the weight is the dt/dr Jacobian; -alpha'/(1-alpha) was 1.26x for
    cosine and 1.37x for poly-2)."""
    probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (VOCAB - 1,)) * 1.5)
    log_p = jnp.concatenate([jnp.log(probs), jnp.array([-1e9])])  # [MASK] never predicted
    x0 = jax.random.categorical(jax.random.PRNGKey(1), jnp.log(probs), shape=(16, 32))
    mask = jnp.ones_like(x0, jnp.float32)
    true_ce = float(-jnp.log(probs)[x0].mean())

    def logits_fn(tokens, positions):
        del positions
        return jnp.broadcast_to(log_p, tokens.shape + (VOCAB,))

    def one(rng):
        return block.nelbo_terms(logits_fn, x0, mask, rng, schedule, 4, MASK, 1e-3, 1.0, antithetic=True)["nll_sum"]

    nll = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(2), 400)) / x0.size
    assert float(nll.mean()) == pytest.approx(true_ce, rel=0.015), (float(nll.mean()), true_ce)


def test_resample_forces_every_block_into_the_clip_interval():
    """BD3-LM's training.resample: blocks whose realised masked fraction is outside [beta, omega] are re-drawn
    (with the same probabilities); blocks already inside are left as they were."""
    keep = jnp.full((64, 32), 0.4)  # mask prob 0.6 per token, blocks of 4: fractions 0 .. 1 all occur
    first = jax.random.uniform(jax.random.PRNGKey(0), keep.shape) < 0.6
    out = np.asarray(block.resample_masks(jax.random.PRNGKey(1), first, keep, 4, 0.45, 0.95))
    fractions = out.reshape(64, 8, 4).mean(-1)
    assert ((fractions >= 0.45) & (fractions <= 0.95)).all()
    before = np.asarray(first).reshape(64, 8, 4)
    inside = (before.mean(-1) >= 0.45) & (before.mean(-1) <= 0.95)
    assert (~inside).any() and (out.reshape(64, 8, 4)[inside] == before[inside]).all()
    # through the loss: the realised mask rate moves into the interval
    x0, mask = _x0(8, 16), jnp.ones((8, 16))
    terms = block.nelbo_terms(lambda tokens, positions: jnp.zeros(tokens.shape + (VOCAB,)), x0, mask,
                              jax.random.PRNGKey(2), MaskSchedule("linear"), 4, MASK, 0.45, 0.95, resample=True)
    assert 0.45 <= float(terms["mask_rate"]) <= 0.95 and np.isfinite(float(terms["nll_sum"]))


def test_resample_needs_a_reachable_fraction():
    c = config_lib.apply_overrides(families.base_config(), [
        "--config.model.family=block", "--config.data.seq_len=32", "--config.block.block_size=4",
        "--config.block.clip_beta=0.3", "--config.block.clip_omega=0.45", "--config.block.resample=true"])
    with pytest.raises(UserError, match=r"block.resample: no block of 4 tokens can have a masked fraction in"):
        families.validate(c)
    families.validate(config_lib.apply_overrides(c, ["--config.block.clip_omega=0.5"]))  # 2/4 is reachable


def test_block_family_trains_with_resample():
    c, fam, _, params = _model("block", block_size=4)
    c.block.resample = True
    batch = {"tokens": _x0(4, 16), "loss_mask": jnp.ones((4, 16))}
    loss, metrics = jax.jit(lambda p: fam.loss(p, batch, jax.random.PRNGKey(0), True))(params)
    assert np.isfinite(float(loss)) and 0.45 <= float(metrics["mask_rate"]) <= 0.95


def test_window_entropy_and_stop_lengths():
    tokens = jnp.asarray([[1, 1, 1, 1], [1, 2, 3, 4], [1, 1, 2, 2]], jnp.int32)
    np.testing.assert_allclose(block_sampling.window_entropy(tokens, jnp.int32(4), 4), [0.0, np.log(4), np.log(2)],
                               atol=1e-6)
    generated = jnp.asarray([False] + [True] * 15)  # position 0 is a prompt token
    rows = jnp.asarray([[5] * 16, [5, 5, 5, 5, 5, 9, 5, 9] + [5] * 8, [9] + [5] * 15], jnp.int32)
    stop = block_sampling.stop_lengths(rows, generated, jnp.int32(4), 4, 9, True, 0.0)
    np.testing.assert_array_equal(stop, [16, 6, 16])  # first generated EOS of the block at 4..7 (prompt EOS: no)
    long = jnp.concatenate([jnp.arange(256), jnp.full((256,), 7)])[None].astype(jnp.int32)  # diverse, then flat
    gen = jnp.ones((512,), bool)
    assert int(block_sampling.stop_lengths(long, gen, jnp.int32(496), 16, -1, False, 4.0)[0]) == 256  # drop window
    assert int(block_sampling.stop_lengths(long, gen, jnp.int32(240), 16, -1, False, 4.0)[0]) == 512  # 256 done
    assert int(block_sampling.stop_lengths(long, gen, jnp.int32(256), 16, -1, False, 4.0)[0]) == 512  # H > 4
    flat = jnp.full((1, 128), 7, jnp.int32)  # a short sample is never checked (BD3-LM: only past 256 tokens)
    assert int(block_sampling.stop_lengths(flat, gen[:128], jnp.int32(112), 16, -1, False, 4.0)[0]) == 128


def test_variable_length_block_sampling_stops_at_eos():
    """A stub denoiser that predicts EOS at position 9 and token 3 elsewhere: with stop_at_eos every sample ends
    there (EOS after it), the loop stops after that block (fewer forwards), and the tokens before it are kept."""
    from dlm_jax.diffusion.schedules import MaskSchedule
    from dlm_jax.sampling import block as block_sampling
    from dlm_jax.sampling.masked import MaskedSampling

    eos = 11

    def full_fn(tokens, t):
        want = jnp.where(jnp.arange(16) == 9, eos, 3)
        return jnp.broadcast_to(jnp.where(jnp.arange(VOCAB) == want[:, None], 0.0, -1e9), tokens.shape + (VOCAB,))

    template = jnp.asarray([2] + [MASK] * 15, jnp.int32)  # the masked template, as the family passes it

    def run(stop):
        spec = SampleSpec("block_nocache", 2, 16, steps=8,
                          options=block_sampling.BlockOptions(inner="topk_confidence", stop_at_eos=stop))
        ms = MaskedSampling(spec, MASK, MaskSchedule("linear"), 1e-3)
        return block_sampling.block_sample(None, full_fn, None, jax.random.PRNGKey(0), template, spec, ms, 4, eos)

    tokens, stats = run(True)
    np.testing.assert_array_equal(stats["lengths"], [10, 10])
    np.testing.assert_array_equal(tokens[0], [2] + [3] * 8 + [eos] * 7)
    fixed, fixed_stats = run(False)
    assert "lengths" not in fixed_stats and (fixed[:, 10:] == 3).all()
    assert int(stats["nfe"]) == 3 * 2 and int(fixed_stats["nfe"]) == 4 * 2  # 3 of 4 blocks, 2 steps each


def test_sliding_window_positions_each_block_inside_its_window():
    """A stub denoiser whose prediction at each position is that position's index inside the array it is given:
    with a window W every block of a 32-token sample is predicted inside [end - W, end) (the first W tokens for the
    early blocks), so the tokens read back the window's offsets; without one, the absolute positions."""
    from dlm_jax.diffusion.schedules import MaskSchedule
    from dlm_jax.sampling import block as block_sampling
    from dlm_jax.sampling.masked import MaskedSampling

    vocab = 40  # ids 0..38 real, 39 = [MASK]

    def full_fn(tokens, t):
        pos = jnp.arange(tokens.shape[1])
        return jnp.broadcast_to(jnp.where(jnp.arange(vocab) == pos[:, None], 0.0, -1e9), tokens.shape + (vocab,))

    template = jnp.full((32,), vocab - 1, jnp.int32)

    def run(window):
        spec = SampleSpec("block_nocache", 1, 32, steps=8,
                          options=block_sampling.BlockOptions(inner="topk_confidence", window=window))
        ms = MaskedSampling(spec, vocab - 1, MaskSchedule("linear"), 1e-3)
        return np.asarray(block_sampling.block_sample(None, full_fn, None, jax.random.PRNGKey(0), template, spec, ms,
                                                      4, 0)[0][0])

    np.testing.assert_array_equal(run(0), np.arange(32))
    # W = 12: blocks ending at 4, 8, 12 see [0, 12); the block ending at e > 12 sees [e - 12, e): offsets 8..11
    np.testing.assert_array_equal(run(12), np.concatenate([np.arange(12)] + [np.arange(8, 12)] * 5))


def test_sliding_window_sampling_past_the_training_length():
    """semi_ar (MDLM) and block_nocache (block diffusion) sample 2 x data.seq_len tokens with a window; without a
    window, a too-long sample, a window that does not fit, and the exact cache with a window are one-line errors."""
    for family, sampler in (("mdlm", "semi_ar"), ("block", "block_nocache")):
        _, fam, _, params = _model(family, block_size=4)
        seq_len = fam.config.data.seq_len
        options = {"block_length": 4} if family == "mdlm" else {}
        template = np.full(2 * seq_len, -1, np.int32)
        tokens, nfe = _sample(fam, params, sampler, template, 2 * seq_len // 4, window=seq_len, **options)
        assert tokens.shape == (3, 2 * seq_len) and not (tokens == MASK).any() and nfe >= 1
        spec = SampleSpec(sampler, 1, 2 * seq_len, steps=2 * seq_len // 4,
                          options=fam.sampler(sampler).options(**options))
        with pytest.raises(UserError, match=f"trained on data.seq_len={seq_len}.*--sampler.window"):
            fam.check_sample(spec, template)
        spec = dataclasses.replace(spec, options=fam.sampler(sampler).options(window=2 * seq_len, **options))
        with pytest.raises(UserError, match="at most the model's data.seq_len"):
            fam.check_sample(spec, template)
    spec = SampleSpec("block", 1, 16, steps=8, options=fam.sampler("block").options(window=8))
    with pytest.raises(UserError, match="use --sampler=block_nocache"):
        fam.check_sample(spec, np.full(16, -1))
