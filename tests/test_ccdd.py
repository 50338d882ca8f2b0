"""CCDD (families/ccdd.py, diffusion/ccdd.py, sampling/ccdd.py, models/ccdd.py): the latent's reverse steps against
closed forms, the bound estimator against an exactly computable toy, `sum` fusion == MDLM without a latent, guidance
at w = 1, the frozen encoder, every fusion variant, and the reference code's known bugs (DESIGN.md section 5)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.diffusion import ccdd, gaussian
from dlm_jax.diffusion.masked import MaskSchedule
from dlm_jax.errors import UserError
from dlm_jax.experiment import build_experiment, load_workdir_config, restore_for_inference
from dlm_jax.families.ccdd import CCDD
from dlm_jax.models.transformer import hidden_states
from dlm_jax.sampling import ccdd as ccdd_sampling
from dlm_jax.sampling.loop import SampleSpec
from dlm_jax.train import sharding
from dlm_jax.train.loop import train
from dlm_jax.train.metrics import read_metrics
from tests.helpers import tiny_config

VP, FLOW = gaussian.LatentSchedule("vp_linear"), gaussian.LatentSchedule("flow_linear")


# -- the latent's reverse steps --------------------------------------------------------------------------------


def _coefficients(step, t, s):
    """(weight on z_t, weight on z0_hat) of a linear step, read off with unit inputs."""
    one, zero = jnp.ones((1, 1, 1)), jnp.zeros((1, 1, 1))
    return float(step(one, zero, t, s)[0, 0, 0]), float(step(zero, one, t, s)[0, 0, 0])


def test_ddim_and_posterior_coefficients_match_closed_forms():
    for t, s in ((0.5, 0.4), (0.1, 0.001)):
        a_t, b_t, a_s, b_s = math.sqrt(1 - t), math.sqrt(t), math.sqrt(1 - s), math.sqrt(s)
        on_zt, on_z0 = _coefficients(lambda z, h, t, s: gaussian.ddim_step(z, h, t, s, VP), t, s)
        np.testing.assert_allclose([on_zt, on_z0], [b_s / b_t, a_s - b_s / b_t * a_t], rtol=1e-5)
        abar_t, abar_s = 1 - t, 1 - s  # DESIGN.md section 5's posterior in abar = a^2
        on_zt, on_z0 = _coefficients(lambda z, h, t, s: gaussian.latent_posterior(z, h, t, s, VP)[0], t, s)
        np.testing.assert_allclose(
            [on_zt, on_z0], [a_t / a_s * (1 - abar_s) / (1 - abar_t), (abar_s - abar_t) / (a_s * (1 - abar_t))],
            rtol=1e-5)
        var = float(gaussian.latent_posterior(jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 1)), t, s, VP)[1])
        np.testing.assert_allclose(var, (abar_s - abar_t) * (1 - abar_s) / (abar_s * (1 - abar_t)), rtol=1e-5)
    # t = 0.1 -> s = 0.001: the posterior puts ~all weight on z0_hat (the reference swapped the two weights)
    on_zt, on_z0 = _coefficients(lambda z, h, t, s: gaussian.latent_posterior(z, h, t, s, VP)[0], 0.1, 0.001)
    assert on_z0 > 0.99 and on_zt < 0.01


@pytest.mark.parametrize("schedule", [VP, FLOW], ids=["vp_linear", "flow_linear"])
def test_posterior_step_keeps_the_forward_marginal_and_its_noise_is_a_standard_deviation(schedule):
    """z_t ~ q(z_t | z0), then z_s ~ q(z_s | z_t, z0) must be distributed as q(z_s | z0) = N(a_s z0, b_s^2): exact
    in the coefficients, and by Monte Carlo through `ddpm_step` (the reference scaled its noise by the variance)."""
    t, s, z0 = 0.6, 0.2, 1.5
    on_zt, on_z0 = _coefficients(lambda z, h, t, s: gaussian.latent_posterior(z, h, t, s, schedule)[0], t, s)
    var = float(gaussian.latent_posterior(jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 1)), t, s, schedule)[1])
    a_t, b_t, a_s, b_s = (float(f(x)) for f, x in ((schedule.a, t), (schedule.b, t), (schedule.a, s), (schedule.b, s)))
    np.testing.assert_allclose(on_zt * a_t * z0 + on_z0 * z0, a_s * z0, rtol=1e-5)
    np.testing.assert_allclose(on_zt**2 * b_t**2 + var, b_s**2, rtol=1e-5)
    shape = (1, 200_000, 1)
    z_t = gaussian.noisy_latent(jnp.full(shape, z0), jnp.full((1,), t), jax.random.normal(jax.random.PRNGKey(0), shape),
                            schedule)
    z_s = np.asarray(gaussian.ddpm_step(jax.random.PRNGKey(1), z_t, jnp.full(shape, z0), t, s, schedule))
    np.testing.assert_allclose([z_s.mean(), z_s.std()], [a_s * z0, b_s], atol=0.01)
    # DDIM is deterministic and keeps the mean
    np.testing.assert_allclose(np.asarray(gaussian.ddim_step(z_t, jnp.full(shape, z0), t, s, schedule)).mean(),
                               a_s * z0, atol=0.01)


def test_training_weights_mse_clip_and_features():
    t = jnp.array([0.5, 0.95])
    np.testing.assert_allclose(ccdd.training_weight(t, "ddpm_x"), [2.0, 10.0], rtol=1e-6)  # min(1/(1-t), 10)
    np.testing.assert_allclose(ccdd.training_weight(t, "inv_snr"), [1.0, 10.0], rtol=1e-6)  # min(t/(1-t), 10)
    z0 = jnp.zeros((2, 3, 4))
    z0_hat = jnp.stack([jnp.full((3, 4), 1.0), jnp.full((3, 4), 5.0)])  # per-token MSE 1 and 25 (clipped to 10)
    terms = ccdd.latent_loss_terms(z0_hat, z0, t, "ddpm_x", jnp.ones((2, 3)))
    np.testing.assert_allclose(terms["latent_sum"], 3 * (2.0 * 1.0 + 10.0 * 10.0), rtol=1e-6)
    np.testing.assert_allclose(terms["latent_mse_sum"], 3 * (1.0 + 25.0), rtol=1e-6)
    hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 48)) * 3.0 + 1.0
    for projection in ccdd.PROJECTIONS:
        z = np.asarray(ccdd.latent_features(hidden, 8, projection))
        assert z.shape == (2, 5, 8)
        np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-5)
        np.testing.assert_allclose(z.var(-1), 1.0, rtol=1e-4)
        np.testing.assert_array_equal(z, np.asarray(ccdd.latent_features(hidden, 8, projection)))  # fixed
    np.testing.assert_allclose(ccdd.latent_features(hidden, 8, "slice"), ccdd.standardize(hidden[..., :8]))


# -- the bound ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [VP, FLOW], ids=["vp_linear", "flow_linear"])
def test_bound_estimator_matches_the_exact_bound_of_a_toy_model(schedule):
    """One token, vocabulary {0, 1} (+ [MASK] = 2), one latent channel with z0 = +1. Toy model: p(x = 1) = q at every
    state (so p(x) = q exactly), z0_hat = z_t. The bound is then exactly
    (1 + eps)(-log q) [token term + reconstruction] + int_eps^1 (1/2)(-SNR') E(z_t - 1)^2 dt, and must sit above
    -log p(x) = -log q; the Monte-Carlo estimator (antithetic t) must match it."""
    q, eps, n = 0.3, 1e-3, 40_000
    logits = jnp.log(jnp.array([1 - q, q, 1e-9]))

    def joint(x_t, z_t, t):
        return jnp.broadcast_to(logits, x_t.shape + (3,)), z_t

    x0, z0, mask = jnp.ones((n, 1), jnp.int32), jnp.ones((n, 1, 1)), jnp.ones((n, 1))
    terms = jax.jit(lambda r: ccdd.bound_terms(joint, x0, z0, mask, r, MaskSchedule(), schedule, eps, 2))(
        jax.random.PRNGKey(0))
    grid = np.geomspace(eps, 1.0, 400_001)
    a, b = np.asarray(schedule.a(grid)), np.asarray(schedule.b(grid))
    integrand = 0.5 * -np.asarray(schedule.snr_derivative(grid)) * ((a - 1.0) ** 2 + b**2)  # E(a + b e - 1)^2
    exact_latent = float(np.sum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(grid)))
    estimates = {k: float(np.mean(v)) for k, v in terms.items()}
    np.testing.assert_allclose(estimates["tokens_given_latent"], -math.log(q), rtol=0.03)
    np.testing.assert_allclose(estimates["recon"], -eps * math.log(q), rtol=0.35)  # ~40 masked rows of 40k
    np.testing.assert_allclose(estimates["latent"], exact_latent, rtol=0.03)
    assert estimates["prior"] == 0.0
    assert sum(estimates.values()) > -math.log(q)  # a bound on the exact -log p(x)


def test_log_uniform_times_integrate_exactly():
    t, weight = ccdd.log_uniform_times(jax.random.PRNGKey(0), 64, 1e-3)
    assert float(t.min()) >= 1e-3 - 1e-9 and float(t.max()) <= 1.0
    np.testing.assert_allclose(weight / t, math.log(1e3), rtol=1e-5)  # int_eps^1 dt/t, exact for every draw


# -- the family, trained ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, train_corpus):
    root = tmp_path_factory.mktemp("encoders")
    out = {}
    for family, extra in (("ar", []), ("mdlm", ["--config.model.time_conditioning=true"])):
        out[family] = str(root / family)
        train(tiny_config(train_corpus, family, ["--config.train.num_steps=2", *extra]), out[family])
    return out


def _ccdd(corpus, encoder, extra=()):
    return tiny_config(corpus, "ccdd", [f"--config.components.encoder.workdir={encoder}", *extra])


def _metrics(workdir, keys):
    return {m["step"]: [m[k] for k in keys] for m in read_metrics(workdir) if "loss" in m}


def test_sum_fusion_without_the_latent_trains_exactly_like_mdlm(tmp_path, train_corpus, encoders):
    train(tiny_config(train_corpus, "mdlm", ["--config.model.time_conditioning=true"]), str(tmp_path / "mdlm"))
    train(_ccdd(train_corpus, encoders["ar"], ["--config.ccdd.latent_weight=0", "--config.ccdd.p_drop_latent=1"]),
          str(tmp_path / "ccdd"))
    mdlm, joint = _metrics(tmp_path / "mdlm", ("loss", "grad_norm")), _metrics(tmp_path / "ccdd", ("loss", "grad_norm"))
    assert sorted(mdlm) == sorted(joint) == [1, 2, 3, 4, 5, 6]
    for step in mdlm:
        np.testing.assert_allclose(joint[step], mdlm[step], rtol=1e-6, atol=1e-6)
    ccdd_rows = [m for m in read_metrics(tmp_path / "ccdd") if "loss" in m]
    np.testing.assert_allclose([m["token_nelbo"] for m in ccdd_rows], [m["loss"] for m in ccdd_rows], rtol=1e-6)


@pytest.mark.parametrize("fusion", ["sum", "two_stream", "joint_attention"])
def test_the_latent_path_gets_gradients_at_init(train_corpus, encoders, fusion):
    """A fresh model's latent head must get gradients: a latent stream that starts all-zero under zero-initialised
    gates and head never trains (two_stream / joint_attention once learnt nothing about z, latent MSE stuck at 1)."""
    exp = build_experiment(_ccdd(train_corpus, encoders["ar"], [f"--config.ccdd.fusion={fusion}"]))
    params = nn.unbox(exp.family.init_params(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (8, 32)).astype(np.int32), "loss_mask": np.ones((8, 32), np.float32)}
    grads = jax.grad(lambda p: exp.family.loss(p, batch, jax.random.PRNGKey(0), True)[0])(params)
    assert float(jnp.abs(grads["latent_head"]["kernel"]).max()) > 0  # the zero-initialised head opens the path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_corpus, encoders):
    """two_stream and joint_attention (sum runs in the family contract tests) trained 3 steps on the AR encoder;
    joint_attention with top-2 routing and the latent's own t."""
    root = tmp_path_factory.mktemp("ccdd")
    out = {}
    for fusion, extra in (("two_stream", []),
                          ("joint_attention", ["--config.ccdd.moe_top_k=2", "--config.ccdd.independent_t=true"])):
        out[fusion] = str(root / fusion)
        train(_ccdd(train_corpus, encoders["ar"], [f"--config.ccdd.fusion={fusion}", "--config.train.num_steps=3",
                                                   *extra]), out[fusion])
    return out


@pytest.mark.parametrize("fusion", ["two_stream", "joint_attention"])
def test_every_fusion_trains_with_both_terms_and_samples(trained, fusion):
    rows = [m for m in read_metrics(trained[fusion]) if "loss" in m]
    for m in rows:  # the latent term is part of the loss (the reference's CCDD loss was unreachable)
        balance = 0.01 * m["moe_balance"] if fusion == "joint_attention" else 0.0
        np.testing.assert_allclose(m["loss"], m["token_nelbo"] + m["latent_loss"] + balance, rtol=1e-5)
        assert m["latent_mse"] > 0 and np.isfinite(m["loss"])
    if fusion == "joint_attention":
        assert all(1.0 <= m["moe_balance"] <= 2.0 + 1e-5 for m in rows)
    exp, params, _ = restore_for_inference(trained[fusion], load_workdir_config(trained[fusion]))
    template = np.array([-1] * 3 + [97, 98] + [-1] * 11, np.int32)
    for options in (ccdd_sampling.CCDDOptions(),
                    ccdd_sampling.CCDDOptions(rule="topk_confidence", latent_step="ddpm", guidance=2.0)):
        spec = SampleSpec("ccdd", 2, 16, steps=6, options=options)
        exp.family.check_sample(spec, template)
        with sharding.mesh_context(exp.mesh):
            tokens, stats = jax.jit(lambda p, f, r, spec=spec: exp.family.bind(f).sample(p, r, spec, template))(
                params, exp.frozen, jax.random.PRNGKey(0))
        tokens = np.asarray(tokens)
        assert tokens.min() >= 0 and tokens.max() < exp.tokenizer.vocab_size
        np.testing.assert_array_equal(tokens[:, 3:5], [[97, 98], [97, 98]])
        if options.guidance != 1.0:  # topk finishes in its 6 steps, every forward guided
            assert int(stats["nfe"]) == 2 * 6
        else:  # 5 ancestral steps, then the argmax pass unless nothing is left
            assert int(stats["nfe"]) in (5, 6)


def test_guidance_weight_one_equals_the_unguided_sampler(trained):
    exp, params, _ = restore_for_inference(trained["two_stream"], load_workdir_config(trained["two_stream"]))
    family = exp.family.bind(exp.frozen)

    def net(tokens, z, t):
        logits, z0_hat, _ = family.model.apply({"params": params}, tokens, z, t)
        return logits, z0_hat

    template = jnp.full((16,), family.mask_id)
    def run(spec, guidance):
        return jax.jit(lambda r: ccdd_sampling.sample(net, r, template, spec, family.masked_sampling(spec),
                                                      family.latent_schedule, 32, guidance))(jax.random.PRNGKey(3))

    for options in (ccdd_sampling.CCDDOptions(), ccdd_sampling.CCDDOptions(rule="topk_confidence", latent_step="ddpm")):
        spec = SampleSpec("ccdd", 4, 16, steps=8, options=options)
        out = {w: run(spec, w) for w in (None, 1.0)}
        np.testing.assert_array_equal(out[None][0], out[1.0][0])
        assert int(out[1.0][1]["nfe"]) == 2 * int(out[None][1]["nfe"])
    cond, uncond = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
    np.testing.assert_array_equal(ccdd.guided_logits(cond, uncond, 1.0), cond)
    np.testing.assert_array_equal(ccdd.guided_logits(cond, uncond, 0.0), uncond)


def test_the_encoder_stays_frozen_and_outside_the_checkpoint(trained, encoders):
    before = restore_for_inference(encoders["ar"], load_workdir_config(encoders["ar"]))[1]
    exp, _, _ = restore_for_inference(trained["two_stream"], load_workdir_config(trained["two_stream"]))
    jax.tree.map(np.testing.assert_array_equal, exp.frozen["encoder"], before)  # training left it as it was
    params, opt_state = exp.abstract_state.params, exp.abstract_state.opt_state
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    fresh = jax.eval_shape(exp.family.init_params, jax.random.PRNGKey(0))
    assert size(params) == size(fresh) and "encoder" not in params
    assert size(opt_state) < 2 * size(params) + 100  # Adam's two moments of the trainable params, nothing more


def test_guidance_is_trained_and_the_latent_is_read(train_corpus, encoders, trained):
    """With p_drop_latent = 1 the token loss cannot depend on the encoder; with 0 it does (params perturbed so the
    zero-initialised latent paths are open): the reference never trained the f(x, 0) that guidance needs."""
    assert CCDD.config_section().p_drop_latent > 0
    exp, params, _ = restore_for_inference(trained["two_stream"], load_workdir_config(trained["two_stream"]))
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (8, 32)).astype(np.int32), "loss_mask": np.ones((8, 32), np.float32)}
    params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape), params)
    noisy = jax.tree.map(lambda x: x + 0.5 * rng.normal(size=x.shape), exp.frozen["encoder"])
    for p_drop, same in ((1.0, True), (0.0, False)):
        family = exp.family
        family.section.p_drop_latent = p_drop
        nelbo = [float(family.bind({"encoder": enc}).loss(params, batch, jax.random.PRNGKey(0), True)[1]
                       ["token_nelbo"]) for enc in (exp.frozen["encoder"], noisy)]
        assert (nelbo[0] == nelbo[1]) == same


def test_p_r_takes_latents_of_the_masked_text_with_masked_positions_zeroed(train_corpus, encoders):
    exp = build_experiment(_ccdd(train_corpus, encoders["mdlm"], ["--config.ccdd.p_r_max=1"]))
    family = exp.family
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 32)), jnp.int32)
    x_t = jnp.where(jnp.arange(32) % 2 == 0, family.mask_id, x0)  # even positions masked
    z0 = family.latent_target(x0, x_t, jnp.full((64,), 0.5), jax.random.PRNGKey(0), train=True)
    clean = family.encode(x0)
    from_masked = ~np.isclose(np.asarray(z0), np.asarray(clean)).all(-1)  # [B, L]
    assert 0 < from_masked.mean() < 1
    picked_masked = from_masked[:, ::2]
    assert picked_masked.any() and np.all(np.asarray(z0)[:, ::2][picked_masked] == 0.0)
    np.testing.assert_array_equal(family.latent_target(x0, x_t, jnp.full((64,), 0.5), jax.random.PRNGKey(0),
                                                       train=False), clean)


@pytest.mark.parametrize("scan", [True, False])
def test_encoder_hidden_states_at_a_layer_and_final(train_corpus, scan):
    exp = build_experiment(tiny_config(train_corpus, "ar", [f"--config.model.scan_layers={scan}"]))
    model = exp.family.model
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    last = hidden_states(model, params, tokens, None, model.cfg.num_layers)
    first = hidden_states(model, params, tokens, None, 1)
    final = hidden_states(model, params, tokens, None, 0)
    assert last.shape == first.shape == final.shape == (2, 8, 32) and not np.allclose(first, last)
    scale = params["final_norm"]["scale"]
    np.testing.assert_allclose(final, last * jax.lax.rsqrt(jnp.mean(last**2, -1, keepdims=True) + 1e-6) * scale,
                               rtol=1e-5, atol=1e-6)


def test_config_errors_name_the_key(train_corpus, encoders):
    with pytest.raises(UserError, match="ccdd.fusion"):
        _ccdd(train_corpus, encoders["ar"], ["--config.ccdd.fusion=cross"])
    with pytest.raises(UserError, match="ccdd.p_r_max > 0 encodes masked text: it needs an mdlm encoder"):
        build_experiment(_ccdd(train_corpus, encoders["ar"], ["--config.ccdd.p_r_max=0.5"]))
    with pytest.raises(UserError, match="ccdd.latent_dim=64 is wider than the encoder"):
        build_experiment(_ccdd(train_corpus, encoders["ar"], ["--config.ccdd.latent_dim=64"]))
    with pytest.raises(UserError, match="ccdd.encoder_layer=5: the encoder has 2 layers"):
        build_experiment(_ccdd(train_corpus, encoders["ar"], ["--config.ccdd.encoder_layer=5"]))
    with pytest.raises(UserError, match="needs --config.components.encoder.workdir"):
        tiny_config(train_corpus, "ccdd")
