"""Samplers: MDLM rules as jitted scans (known tokens fixed, no [MASK] left, cached == ancestral), AR decoding
with and without the KV cache, nucleus / temperature draws with exact entropy, templates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.data.tokenizers import ByteTokenizer
from dlm_jax.diffusion.schedules import MaskSchedule
from dlm_jax.errors import UserError
from dlm_jax.models.transformer import Transformer, TransformerConfig, init_cache
from dlm_jax.sampling import autoregressive as ar
from dlm_jax.sampling import masked
from dlm_jax.sampling.loop import (
    NoOptions,
    SampleSpec,
    argmax_last,
    describe_options,
    make_options,
    nucleus_logits,
    sample_categorical,
)
from dlm_jax.sampling.prompts import build_template

V, MASK = 6, 6
W = 2.0 * jax.random.normal(jax.random.PRNGKey(5), (V + 1, V + 1))


def bigram_logits(z, t):
    """A t-agnostic toy model: every position's logits depend on its own (possibly masked) token."""
    del t
    return W[z]


OPTIONS = {"topk_confidence": masked.TopkOptions, "semi_ar": masked.SemiAROptions, "ancestral": masked.AncestralOptions,
           "cached": masked.AncestralOptions}


def _sample(name, template, steps, n=3, fn=bigram_logits, seed=0, temperature=1.0, **options):
    options_cls = OPTIONS.get(name, NoOptions)
    spec = SampleSpec(sampler=name, num_samples=n, length=template.shape[0], steps=steps, temperature=temperature,
                      options=options_cls(**options))
    masked.check_spec(spec, time_conditioned=False)
    run = jax.jit(lambda rng: masked.sample(fn, rng, template, spec, mask_id=MASK, schedule=MaskSchedule("linear")))
    tokens, stats = run(jax.random.PRNGKey(seed))
    return np.asarray(tokens), int(stats["nfe"])


SAMPLERS = [("ancestral", {}), ("cached", {}), ("first_hitting", {}), ("topk_confidence", {}),
            ("topk_confidence", {"unmask_schedule": "cosine"}), ("semi_ar", {"block_length": 8}),
            ("semi_ar", {"block_length": 8, "inner": "topk_confidence"}),
            ("semi_ar", {"block_length": 8, "inner": "first_hitting"})]


@pytest.mark.parametrize("name,kw", SAMPLERS)
def test_known_tokens_never_change_and_no_mask_is_left(name, kw):
    template = jnp.full((24,), MASK).at[:3].set(jnp.array([1, 2, 3])).at[10:13].set(jnp.array([4, 0, 5]))
    tokens, nfe = _sample(name, template, steps=12, **kw)
    known = np.asarray(template) != MASK
    np.testing.assert_array_equal(tokens[:, known], np.broadcast_to(np.asarray(template)[known], (3, known.sum())))
    assert not (tokens == MASK).any() and tokens.max() < V
    assert 1 <= nfe <= 24


def test_cached_equals_ancestral_token_for_token_with_fewer_forwards():
    template = jnp.full((16,), MASK)
    for seed in range(3):
        reference, nfe_ancestral = _sample("ancestral", template, steps=64, n=1, seed=seed)
        cached, nfe_cached = _sample("cached", template, steps=64, n=1, seed=seed)
        np.testing.assert_array_equal(cached, reference)
        assert nfe_ancestral >= 63 and nfe_cached <= min(64, 16)


def test_cached_skips_the_forward_for_real():
    """The skipped forward is not executed: count calls of a host callback inside the model."""
    calls = []

    def counting(z, t):
        jax.debug.callback(lambda: calls.append(1))
        return bigram_logits(z, t)

    _, nfe = _sample("cached", jnp.full((8,), MASK), steps=64, n=1, fn=counting)
    jax.effects_barrier()
    assert len(calls) == nfe <= 8


def test_first_hitting_uses_one_forward_per_masked_token():
    template = jnp.full((20,), MASK).at[:5].set(1)
    _, nfe = _sample("first_hitting", template, steps=1, n=2)
    assert nfe == 15


def test_semi_ar_fills_blocks_left_to_right():
    """Logits point at (number of unmasked tokens) mod V: with one argmax step per block, block b sees exactly
    the b earlier blocks unmasked, so it is filled with (4 b) mod V."""

    def counter(z, t):
        count = jnp.sum(z != MASK, axis=-1)  # [N]
        return jnp.broadcast_to(10.0 * jax.nn.one_hot(count % V, V + 1)[:, None, :], z.shape + (V + 1,))

    tokens, nfe = _sample("semi_ar", jnp.full((12,), MASK), steps=3, n=1, fn=counter, block_length=4,
                          inner="topk_confidence", temperature=0.0)
    np.testing.assert_array_equal(tokens[0], [0] * 4 + [4] * 4 + [2] * 4)
    assert nfe == 3


def test_topk_linear_schedule_commits_evenly():
    """T = L/2 with a linear schedule commits exactly two tokens per step."""
    seen = []

    def recording(z, t):
        jax.debug.callback(lambda c: seen.append(int(c)), jnp.sum(z[0] == MASK))
        return bigram_logits(z, t)

    _sample("topk_confidence", jnp.full((12,), MASK), steps=6, n=1, fn=recording)
    jax.effects_barrier()
    assert seen == [12, 10, 8, 6, 4, 2]


def test_sampler_errors_are_one_line():
    with pytest.raises(UserError, match="unknown masked-diffusion rule 'nope'"):
        masked.check_spec(SampleSpec("nope", 1, 8), False)
    with pytest.raises(UserError, match="time_conditioning=False"):
        masked.check_spec(SampleSpec("cached", 1, 8), True)
    with pytest.raises(UserError, match="not divisible by the block length"):
        masked.check_spec(SampleSpec("semi_ar", 1, 10, options=masked.SemiAROptions(block_length=4)), False)
    with pytest.raises(UserError, match="fewer than the 4 blocks"):
        masked.check_spec(SampleSpec("semi_ar", 1, 16, steps=3, options=masked.SemiAROptions(block_length=4)), False)


def test_sampler_options_are_typed_and_documented():
    opts = make_options("semi_ar", masked.SemiAROptions, {"block_length": "8", "inner": "cached"})
    assert opts == masked.SemiAROptions(block_length=8, inner="cached")
    assert make_options("semi_ar", masked.SemiAROptions, {}) == masked.SemiAROptions()
    with pytest.raises(UserError, match=r"no option 'blocks'; its options: block_length=0, inner=ancestral"):
        make_options("semi_ar", masked.SemiAROptions, {"blocks": "8"})
    with pytest.raises(UserError, match="'sampler.block_length' wants a int"):
        make_options("semi_ar", masked.SemiAROptions, {"block_length": "eight"})
    with pytest.raises(UserError, match="choose one of ancestral, cached, first_hitting, topk_confidence"):
        make_options("semi_ar", masked.SemiAROptions, {"inner": "semi_ar"})
    with pytest.raises(UserError, match="sampler 'ancestral' has no option 'inner'; its options: none"):
        make_options("ancestral", NoOptions, {"inner": "cached"})
    text = describe_options("topk_confidence", masked.TopkOptions)
    assert "--sampler.unmask_schedule=linear" in text and "linear, cosine" in text
    assert describe_options("ancestral", NoOptions) == "ancestral: no options of its own"


# ---------------------------------------------------------------------------------------------- AR


@pytest.fixture(scope="module")
def tiny_ar():
    cfg = TransformerConfig(vocab_size=11, num_layers=2, d_model=32, num_heads=4, mlp_dim=64, mask_mode="causal")
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x.shape), params)
    return model, params


def _ar_draw(model, params, sampler, template, temperature, top_p=1.0, seed=0):
    spec = SampleSpec(sampler, 4, len(template), temperature=temperature, top_p=top_p)
    num_prompt = ar.check_prompt(template)
    template = jnp.asarray(template)

    def run(rng):
        if sampler == "ar_nocache":
            return ar.sample_nocache(lambda x: model.apply({"params": params}, x), rng, template, spec, 10, num_prompt)
        decode = lambda x, cache, i: model.apply({"params": params}, x, cache=cache, cache_index=i)  # noqa: E731
        return ar.sample_cached(decode, init_cache(model.cfg, 4, len(template)), rng, template, spec, 10, num_prompt)

    tokens, stats = jax.jit(run)(jax.random.PRNGKey(seed))
    return np.asarray(tokens), int(stats["nfe"])


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (1.0, 0.8)])
@pytest.mark.parametrize("prompt", [[], [3, 1, 4]])
def test_ar_with_cache_equals_ar_without(tiny_ar, temperature, top_p, prompt):
    model, params = tiny_ar
    template = np.array(prompt + [-1] * (16 - len(prompt)), np.int32)
    with_cache, nfe_cache = _ar_draw(model, params, "ar", template, temperature, top_p)
    without, nfe_plain = _ar_draw(model, params, "ar_nocache", template, temperature, top_p)
    np.testing.assert_array_equal(with_cache, without)
    np.testing.assert_array_equal(with_cache[:, : len(prompt)], np.broadcast_to(prompt, (4, len(prompt))))
    assert nfe_cache == nfe_plain == 16 - len(prompt)
    if temperature > 0:
        assert len({tuple(r) for r in with_cache}) > 1  # real sampling, rows differ


def test_ar_refuses_infilling():
    with pytest.raises(UserError, match="only continue a prompt"):
        ar.check_prompt(np.array([1, -1, 2, -1]))


# ---------------------------------------------------------------------------------------------- draws


def _entropy_bits(p):
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_sample_entropy_matches_exact_sampling_on_a_toy_vocabulary():
    """A long-tailed distribution (probabilities down to 1e-4): draws must reproduce its entropy and tail mass."""
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.0199, 0.0001])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (400_000, len(probs)))
    draws = np.asarray(sample_categorical(jax.random.PRNGKey(0), logits))
    freq = np.bincount(draws, minlength=len(probs)) / draws.size
    assert abs(_entropy_bits(freq) - _entropy_bits(probs)) < 0.005
    np.testing.assert_allclose(freq, probs, atol=2.5e-3)
    assert 10 <= (draws == 7).sum() <= 70  # the 1e-4 tail is sampled (expected 40)


def test_argmax_last_equals_jnp_argmax_with_ties_and_infinities():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, size=(64, 7, 11)).astype(np.float32)  # many ties: the first index must win
    x[0, 0] = -np.inf
    x[0, 1, 4:] = np.inf
    x[1] = rng.normal(size=(7, 11))
    np.testing.assert_array_equal(argmax_last(jnp.asarray(x)), np.argmax(x, axis=-1))
    assert argmax_last(jnp.asarray(x)).dtype == jnp.int32
    assert int(argmax_last(jnp.full((5,), jnp.nan))) == 4  # never an index out of range


def test_temperature_and_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = np.isfinite(np.asarray(nucleus_logits(logits, 0.8)))
    np.testing.assert_array_equal(kept, [True, True, False, False])  # 0.5 + 0.3 reaches 0.8
    np.testing.assert_array_equal(np.isfinite(np.asarray(nucleus_logits(logits, 0.1))), [True, False, False, False])
    draws = np.asarray(sample_categorical(jax.random.PRNGKey(1), jnp.broadcast_to(logits, (200_000, 4)), 1.0, 0.8))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, [0.625, 0.375, 0, 0], atol=4e-3)
    hot = np.asarray(sample_categorical(jax.random.PRNGKey(2), jnp.broadcast_to(logits, (200_000, 4)), 2.0))
    tempered = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(np.bincount(hot, minlength=4) / hot.size, tempered, atol=4e-3)
    assert np.all(np.asarray(sample_categorical(jax.random.PRNGKey(3), jnp.broadcast_to(logits, (8, 4)), 0.0)) == 0)


# ---------------------------------------------------------------------------------------------- templates


def test_prompt_and_infill_templates():
    tok = ByteTokenizer()
    np.testing.assert_array_equal(build_template(tok, 5, prompt="ab"), [97, 98, -1, -1, -1])
    np.testing.assert_array_equal(build_template(tok, None, infill="a[MASK*2]b[MASK]"), [97, -1, -1, 98, -1])
    np.testing.assert_array_equal(build_template(tok, 6, infill="a[MASK]"), [97, -1, -1, -1, -1, -1])
    with pytest.raises(UserError, match="leaves nothing to generate"):
        build_template(tok, 2, prompt="abc")
    with pytest.raises(UserError, match="no \\[MASK\\]"):
        build_template(tok, None, infill="abc")


def test_commit_rules_by_hand():
    todo = jnp.array([[True, True, False, True], [False, False, False, False]])
    confidence = jnp.array([[0.1, 0.9, 0.99, 0.5], [0.3, 0.2, 0.1, 0.0]])
    np.testing.assert_array_equal(masked.topk_commit(confidence, todo, jnp.array([2, 1])),
                                  [[False, True, False, True], [False] * 4])  # never outside todo
    one = np.asarray(masked.first_hitting_commit(jax.random.PRNGKey(0), jnp.broadcast_to(todo[0], (500, 4))))
    assert (one.sum(-1) == 1).all() and not one[:, 2].any()
    assert np.allclose(one[:, [0, 1, 3]].mean(0), 1 / 3, atol=0.07)  # uniform over the todo positions
    rate = masked.ancestral_commit(jax.random.PRNGKey(1), jnp.ones((200, 100), bool), MaskSchedule("linear"),
                                   jnp.asarray(0.8), jnp.asarray(0.6))
    assert abs(float(rate.mean()) - 0.25) < 0.01  # (alpha_s - alpha_t) / (1 - alpha_t) = 0.2 / 0.8


@pytest.mark.parametrize("name", ["ancestral", "cached", "first_hitting", "topk_confidence", "semi_ar"])
def test_a_proposal_plugs_into_every_rule(name):
    """A custom proposal (here: always token 3, checking what it is given) replaces the denoiser's draw; the
    commit rule and the known tokens are untouched."""
    template = jnp.full((8,), MASK).at[0].set(1)
    seen_t = []

    def always_three(rng, logits, tokens, t):
        assert logits.shape == tokens.shape + (V + 1,)
        jax.debug.callback(lambda t: seen_t.append(float(np.min(t))), t)
        return jnp.full_like(tokens, 3)

    spec = SampleSpec(name, 2, 8, steps=4, options=OPTIONS.get(name, NoOptions)())
    tokens, _ = jax.jit(lambda rng: masked.sample(bigram_logits, rng, template, spec, mask_id=MASK,
                                                  schedule=MaskSchedule("linear"), proposal=always_three))(
        jax.random.PRNGKey(0))
    jax.effects_barrier()
    tokens = np.asarray(tokens)
    assert (tokens[:, 0] == 1).all()
    assert seen_t and all(0.0 <= t <= 1.0 for t in seen_t)
    if name in ("first_hitting", "topk_confidence"):  # these commit every token themselves
        assert (tokens[:, 1:] == 3).all()
    else:  # ancestral rules leave some [MASK]s to the final argmax pass (the denoiser's argmax, not a proposal)
        assert (tokens[:, 1:] == 3).any()


@pytest.mark.parametrize("t_eps", [1e-3, 0.05])
def test_semi_ar_with_cached_inside_equals_semi_ar_with_ancestral(t_eps):
    """The argmax fill at the end of a block changes the tokens, so the next block must not reuse the cached
    logits (leftovers after the last reverse step are rare at t_eps 1e-3: more seeds); and no extra forwards."""
    template = jnp.full((16,), MASK)
    mix = 2.0 * jax.random.normal(jax.random.PRNGKey(6), (V + 1, V + 1))

    def context_logits(z, t):  # every position sees the whole sequence (a per-position toy would hide the bug)
        return bigram_logits(z, t) + jnp.mean(mix[z], axis=1, keepdims=True)

    def run(inner):
        spec = SampleSpec("semi_ar", 1, 16, steps=34, options=masked.SemiAROptions(block_length=8, inner=inner))
        one = lambda rng: masked.sample(context_logits, rng, template, spec, mask_id=MASK,  # noqa: E731
                                        schedule=MaskSchedule("linear"), t_eps=t_eps)
        return jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(3), 20_000 if t_eps < 0.01 else 2000))

    (cached, stats_cached), (ancestral, stats_ancestral) = run("cached"), run("ancestral")
    np.testing.assert_array_equal(cached, ancestral)
    assert (np.asarray(stats_cached["nfe"]) <= np.asarray(stats_ancestral["nfe"])).all()


def _tail_frequency(gap: float, chunks: int) -> float:
    """Observed / exact frequency of the token `gap` nats below the top of a two-token distribution, over
    chunks x 2^22 draws of sample_categorical."""

    def body(i, count):
        logits = jnp.broadcast_to(jnp.array([0.0, -gap]), (1 << 22, 2))
        return count + jnp.sum(sample_categorical(jax.random.fold_in(jax.random.PRNGKey(4), i), logits))

    count = jax.jit(lambda: jax.lax.fori_loop(0, chunks, body, 0))()
    return float(count) / (chunks * (1 << 22) * float(jax.nn.sigmoid(-gap)))


@pytest.mark.slow
@pytest.mark.parametrize("gap,chunks,tolerance", [(12.0, 4, 0.25), (16.0, 64, 0.35)])
def test_categorical_draws_keep_the_far_tail(gap, chunks, tolerance):
    """Tokens 12 and 16 nats below the top are drawn at their probability (expected 103 and 30 hits): jax's
    low-precision Gumbel noise drew the 16-nat token at ~0.56x its probability. (20 nats: expected 0.04 hits at
    this budget, beyond a CPU test; the high mode's noise reaches ~32, so it is not cut off either.)"""
    assert abs(_tail_frequency(gap, chunks) - 1.0) < tolerance


def test_cosine_time_grid_matches_md4_and_ends_at_eps():
    """MD4's cosine sampling grid: t_i = cos(pi/2 (1 - (T - i)/T)), scaled into [eps, 1]; denser near t = 1."""
    eps, steps = 1e-3, 4
    cosine = masked.MaskedSampling(SampleSpec("ancestral", 1, 8, options=masked.AncestralOptions("cosine")), MASK,
                                   MaskSchedule("linear"), eps)
    linear = masked.MaskedSampling(SampleSpec("ancestral", 1, 8), MASK, MaskSchedule("linear"), eps)
    times = np.array([float(cosine.grid(jnp.asarray(i), steps)[0]) for i in range(steps)]
                     + [float(cosine.grid(jnp.asarray(steps - 1), steps)[1])])
    want = eps + (1 - eps) * np.cos(np.pi / 2 * (1 - (steps - np.arange(steps + 1)) / steps))
    np.testing.assert_allclose(times, want, rtol=1e-6, atol=1e-7)
    assert times[0] == pytest.approx(1.0) and times[-1] == pytest.approx(eps, abs=1e-7)
    assert np.all(np.diff(times) < 0) and -np.diff(times)[0] < -np.diff(times)[-1]  # small first steps
    assert float(linear.grid(jnp.asarray(1), steps)[0]) == pytest.approx(1 - (1 - eps) / steps)
    tokens, _ = _sample("ancestral", jnp.full((16,), MASK).at[:2].set(1), steps=8, time_grid="cosine")
    assert (tokens[:, :2] == 1).all() and not (tokens == MASK).any()
