"""Cosmos (families/cosmos_ae.py, families/cosmos.py, diffusion/cosmos.py, sampling/cosmos.py, models/cosmos.py): the
VP tan-d schedule, DDIM with a perfect predictor, self-conditioning off == no self-conditioning input, the
autoencoder overfitting a tiny batch, the statistics files, the frozen autoencoder and encoder, and the reference
code's known bugs (DESIGN.md section 7)."""

import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlm_jax.diffusion import cosmos, gaussian
from dlm_jax.errors import UserError
from dlm_jax.experiment import (
    build_experiment,
    load_statistics,
    load_workdir_config,
    restore_for_inference,
    save_statistics,
    statistics_path,
)
from dlm_jax.families.cosmos_ae import CosmosAE
from dlm_jax.models.cosmos import CosmosAutoencoder, LatentDenoiser
from dlm_jax.models.transformer import TransformerConfig
from dlm_jax.sampling import cosmos as cosmos_sampling
from dlm_jax.sampling.loop import SampleSpec
from dlm_jax.train import sharding
from dlm_jax.train.loop import statistics_batches, train
from tests.helpers import ROOT, tiny_config

NO_AUGMENTATION = ("--config.cosmos_ae.token_mask=0", "--config.cosmos_ae.mix_d=1.0",
                   "--config.cosmos_ae.latent_dropout=0")
TAN = gaussian.LatentSchedule("vp_tan", 5.0)


# -- the schedule and the reverse step ---------------------------------------------------------------------------


def test_vp_tan_schedule_endpoints_monotone_and_snr():
    t = jnp.linspace(0.0, 1.0, 201)
    a, b = np.asarray(TAN.a(t)), np.asarray(TAN.b(t))
    assert a[0] == 1.0 and b[0] == 0.0
    assert a[-1] < 1e-6 and abs(b[-1] - 1.0) < 1e-6  # alpha at t -> 1 goes to 0
    assert np.all(np.diff(a) < 0) and np.all(np.diff(b) > 0)
    np.testing.assert_allclose(a**2 + b**2, 1.0, atol=1e-6)
    # alpha_t = 1 / sqrt(1 + d^2 tan^2(pi t / 2)) at a hand-computable point: t = 1/2, tan = 1
    np.testing.assert_allclose(float(TAN.a(0.5)), 1 / np.sqrt(26.0), rtol=1e-6)
    inner = jnp.linspace(0.05, 0.95, 10)
    np.testing.assert_allclose(TAN.snr(inner), TAN.a(inner) ** 2 / TAN.b(inner) ** 2, rtol=1e-4)
    np.testing.assert_allclose(TAN.snr_derivative(inner), jax.vmap(jax.grad(TAN.snr))(inner), rtol=1e-3)


def test_ddim_step_with_the_true_x0_lands_on_the_same_noise_path():
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, 4, 3)).astype(np.float32), rng.normal(size=(2, 4, 3)).astype(np.float32)
    for t, s in ((1.0, 0.9), (0.6, 0.3), (0.2, 0.05)):
        z_t = gaussian.noisy_latent(x0, jnp.full((2,), t), eps, TAN)
        z_s = gaussian.ddim_step(z_t, x0, jnp.full((2,), t), jnp.full((2,), s), TAN)
        np.testing.assert_allclose(z_s, gaussian.noisy_latent(x0, jnp.full((2,), s), eps, TAN), atol=1e-5)


@pytest.mark.parametrize("step", cosmos_sampling.STEPS)
def test_sampler_with_a_perfect_x0_predictor_recovers_x0_exactly(step):
    """Latents [N slots = L, C = V]; the 'decoder' reads a latent row as token logits, so the tokens say whether
    the final x0_hat is x0."""
    vocab, length = 5, 6
    target = np.array([3, 1, 4, 1, 0, 2])
    x0 = jnp.asarray(np.eye(vocab, dtype=np.float32)[target] * 4.0)
    seen = []

    def denoiser(z, t, x0_sc):
        seen.append(x0_sc)
        return jnp.broadcast_to(x0, z.shape)

    spec = SampleSpec("cosmos", 3, length, steps=7, options=cosmos_sampling.CosmosOptions(step=step))
    tokens, stats = jax.jit(lambda r: cosmos_sampling.sample(denoiser, lambda x: x, r, np.full(length, -1), spec,
                                                             TAN, (length, vocab), True))(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(tokens, np.broadcast_to(target, (3, length)))
    assert int(stats["nfe"]) == 8 and seen[0] is not None  # 7 denoiser steps + 1 decode; x0_hat fed back


def test_time_grid_runs_from_one_to_t_min():
    np.testing.assert_allclose(cosmos_sampling.time_grid(5, 0.2), [1.0, 0.8, 0.6, 0.4, 0.2], atol=1e-6)


# -- self-conditioning ------------------------------------------------------------------------------------------


def test_self_conditioning_off_equals_a_model_without_it():
    cfg = TransformerConfig(vocab_size=1, num_layers=3, d_model=32, num_heads=2, mlp_dim=64, time_conditioning=True)
    with_sc, without = LatentDenoiser(cfg, 8, True), LatentDenoiser(cfg, 8, False)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8))
    t = jnp.array([0.3, 0.8])
    params = flax.linen.meta.unbox(with_sc.init(jax.random.PRNGKey(1), z, t, z)["params"])
    params = jax.tree.map(lambda x: x + 0.05, params)  # nonzero heads and adaLN, so the outputs are not trivially 0
    plain = {k: v for k, v in params.items() if k != "self_cond_in"}
    reference = without.apply({"params": plain}, z, t)
    np.testing.assert_array_equal(with_sc.apply({"params": params}, z, t, None), reference)
    np.testing.assert_array_equal(with_sc.apply({"params": params}, z, t, jnp.zeros_like(z)), reference)

    def denoiser(z_, t_, sc):
        return without.apply({"params": plain}, z_, t_, sc)

    # p = 0: the training prediction is the one forward of the model without the input
    np.testing.assert_array_equal(cosmos.self_conditioned_x0(denoiser, z, t, jax.random.PRNGKey(2), 0.0), reference)
    assert not np.allclose(with_sc.apply({"params": params}, z, t, z), reference)  # the input is live


# -- augmentations ----------------------------------------------------------------------------------------------


def test_augmentations_act_on_disjoint_halves():
    rows = cosmos.first_half(6)
    np.testing.assert_array_equal(rows, [True, True, True, False, False, False])
    latents = jnp.ones((6, 4, 8))
    mixed = cosmos.gaussian_mix(jax.random.PRNGKey(0), latents, ~rows, 0.7)
    np.testing.assert_array_equal(mixed[:3], latents[:3])
    assert not np.allclose(mixed[3:], 1.0)
    np.testing.assert_array_equal(cosmos.gaussian_mix(jax.random.PRNGKey(0), latents, ~rows, 1.0), latents)
    dropped = np.asarray(cosmos.latent_dropout(jax.random.PRNGKey(1), latents, ~rows, 0.4))
    assert np.all(dropped[:3] == 1.0) and set(np.unique(dropped[3:])) == {0.0, np.float32(1.0 / 0.6)}
    keep = cosmos.compressor_keep(jax.random.PRNGKey(2), jnp.ones((6, 64)), rows, 0.3)
    assert np.all(keep[3:]) and 0.5 < float(keep[:3].mean()) < 0.9


def test_token_masking_removes_positions_from_the_compressors_keys():
    """Reference bug: its zeroing line of token masking is dead and only the attention mask acts; here the key mask
    is the mechanism, and a dropped position has no influence on the latents at all."""
    cfg = TransformerConfig(vocab_size=20, num_layers=2, d_model=32, num_heads=2, mlp_dim=64)
    model = CosmosAutoencoder(cfg, 8, 2)
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    params = model.init(jax.random.PRNGKey(0), tokens, jnp.ones((2, 8), bool))["params"]
    keep = jnp.ones((2, 8), bool).at[:, 3].set(False)
    changed = tokens.at[:, 3].set(19)

    def encode(x, k):
        return model.apply({"params": params}, x, k, method=CosmosAutoencoder.encode)

    np.testing.assert_array_equal(encode(tokens, keep), encode(changed, keep))
    assert not np.allclose(encode(tokens, jnp.ones((2, 8), bool)), encode(changed, jnp.ones((2, 8), bool)))


def test_augmentation_defaults_are_the_documented_ones():
    """Reference bug: its README and scripts disagree on the augmentation values; ours live in one place, the
    config section, and docs/cosmos.md states the same numbers."""
    section = CosmosAE.config_section()
    assert (section.token_mask, section.mix_d, section.latent_dropout) == (0.3, 0.7, 0.4)
    docs = open(os.path.join(ROOT, "docs", "cosmos.md")).read()
    for key in ("token_mask", "mix_d", "latent_dropout", "compression", "mse_weight"):
        assert re.search(rf"`cosmos_ae\.{key}` \| `?{section[key]}`? ", docs), key


# -- the autoencoder --------------------------------------------------------------------------------------------


def test_autoencoder_with_compression_1_and_no_augmentation_overfits_a_tiny_batch(train_corpus):
    config = tiny_config(train_corpus, "cosmos_ae", ["--config.mesh.data=1", "--config.cosmos_ae.compression=1",
                                                     *NO_AUGMENTATION])
    exp = build_experiment(config, jax.devices()[:1])
    text = open(train_corpus, "rb").read()[: 8 * 32]
    batch = {"tokens": jnp.asarray(np.frombuffer(text, np.uint8).reshape(8, 32).astype(np.int32)),
             "loss_mask": jnp.ones((8, 32))}
    params = flax.linen.meta.unbox(exp.family.init_params(jax.random.PRNGKey(0)))
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, i):
        grads, metrics = jax.grad(lambda p: exp.family.loss(p, batch, jax.random.PRNGKey(i), True), has_aux=True)(
            params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    opt_state = optimizer.init(params)
    for i in range(150):
        params, opt_state, metrics = step(params, opt_state, i)
    _, metrics = exp.family.loss(params, batch, jax.random.PRNGKey(0), False)
    assert float(metrics["token_accuracy"]) == 1.0 and float(metrics["sequence_accuracy"]) == 1.0


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory, train_corpus):
    workdir = str(tmp_path_factory.mktemp("cosmos") / "ae")
    train(tiny_config(train_corpus, "cosmos_ae", ["--config.train.num_steps=3"]), workdir)
    return workdir


def test_latent_statistics_reload_exactly(autoencoder):
    stats = load_statistics(autoencoder)
    assert set(stats) == {"latent_mean", "latent_std"} and stats["latent_mean"].shape == (8, 32)  # N = 32 / 4
    exp, params, _ = restore_for_inference(autoencoder, load_workdir_config(autoencoder))
    for key, value in stats.items():
        np.testing.assert_array_equal(exp.family.stats[key], value)
    # and they are the statistics of these params' clean val latents
    with sharding.mesh_context(exp.mesh):
        again = exp.family.statistics_after_training(params, statistics_batches(exp, "validation",
                                                                                 sharding.batch_sharding(exp.mesh)))
    for key, value in stats.items():
        np.testing.assert_allclose(again[key], value, rtol=1e-5, atol=1e-6)


def test_statistics_file_updates_and_replaces(tmp_path):
    save_statistics(str(tmp_path), {"a": np.zeros(2), "b": np.ones(3)})
    save_statistics(str(tmp_path), {"a": np.full(2, 7.0)})  # a resumed run saving its end statistics again
    stats = load_statistics(str(tmp_path))
    np.testing.assert_array_equal(stats["a"], [7.0, 7.0])
    np.testing.assert_array_equal(stats["b"], np.ones(3))
    save_statistics(str(tmp_path), {"c": np.zeros(1)}, replace=True)
    assert set(load_statistics(str(tmp_path))) == {"c"}
    open(statistics_path(str(tmp_path)), "w").write("garbage")
    with pytest.raises(UserError, match="statistics.npz is not a readable statistics file; restore it"):
        load_statistics(str(tmp_path))


def test_a_fresh_start_drops_statistics_of_an_earlier_run(tmp_path, train_corpus):
    workdir = tmp_path / "ae"
    workdir.mkdir()
    np.savez(statistics_path(str(workdir)), latent_mean=np.zeros(3), stale=np.ones(2))  # no checkpoint beside it
    train(tiny_config(train_corpus, "cosmos_ae", ["--config.train.num_steps=1"]), str(workdir))
    stats = load_statistics(str(workdir))
    assert set(stats) == {"latent_mean", "latent_std"} and stats["latent_mean"].shape == (8, 32)


def test_stage_two_trains_only_the_denoiser_and_leaves_the_autoencoder_unchanged(tmp_path, autoencoder,
                                                                                  train_corpus):
    before = restore_for_inference(autoencoder, load_workdir_config(autoencoder))[1]
    files = {p: os.path.getmtime(os.path.join(autoencoder, p)) for p in ("statistics.npz", "config.json")}
    workdir = str(tmp_path / "latent")
    config = tiny_config(train_corpus, "cosmos", [f"--config.components.autoencoder.workdir={autoencoder}"])
    train(config, workdir)
    exp, params, step = restore_for_inference(workdir, load_workdir_config(workdir))
    assert step == 6 and "latent_in" in params and "compressor_0" not in params
    after = restore_for_inference(autoencoder, load_workdir_config(autoencoder))[1]
    jax.tree.map(np.testing.assert_array_equal, before, after)
    jax.tree.map(np.testing.assert_array_equal, exp.family.frozen["autoencoder"], after)
    assert files == {p: os.path.getmtime(os.path.join(autoencoder, p)) for p in files}


def test_stage_two_refuses_an_unfinished_autoencoder_and_another_seq_len(tmp_path, autoencoder, train_corpus):
    with pytest.raises(UserError, match=r"seq_len=64 differs from the autoencoder's \(32\)"):
        build_experiment(tiny_config(train_corpus, "cosmos", [f"--config.components.autoencoder.workdir={autoencoder}",
                                                              "--config.data.seq_len=64"]))
    unfinished = str(tmp_path / "unfinished")
    train(tiny_config(train_corpus, "cosmos_ae", ["--config.train.num_steps=1"]), unfinished)
    os.remove(statistics_path(unfinished))
    with pytest.raises(UserError, match="has no latent statistics: its training did not finish"):
        build_experiment(tiny_config(train_corpus, "cosmos", [f"--config.components.autoencoder.workdir={unfinished}"]))
    with pytest.raises(UserError, match="compression=3 must be >= 1 and divide data.seq_len=32"):
        tiny_config(train_corpus, "cosmos_ae", ["--config.cosmos_ae.compression=3"])


def test_frozen_encoder_standardised_with_training_statistics_through_both_stages(tmp_path, train_corpus):
    encoder = str(tmp_path / "mdlm")
    train(tiny_config(train_corpus, "mdlm", ["--config.train.num_steps=1", "--config.model.time_conditioning=true"]),
          encoder)
    ae = str(tmp_path / "ae")
    train(tiny_config(train_corpus, "cosmos_ae", ["--config.cosmos_ae.encoder=frozen",
                                                  f"--config.components.encoder.workdir={encoder}",
                                                  "--config.train.num_steps=2"]), ae)
    stats = load_statistics(ae)
    assert stats["encoder_mean"].shape == stats["encoder_std"].shape == (32,)
    exp, params, _ = restore_for_inference(ae, load_workdir_config(ae))
    tokens = jnp.asarray(np.frombuffer(open(train_corpus, "rb").read()[:32 * 32], np.uint8)
                         .reshape(32, 32).astype(np.int32))
    standardized = np.asarray(exp.family.inputs(tokens)).reshape(-1, 32)
    assert abs(standardized.mean()) < 0.2 and 0.7 < standardized.std() < 1.3  # training statistics fit this text
    _, metrics = exp.family.loss(params, {"tokens": tokens, "loss_mask": jnp.ones((32, 32))},
                                 jax.random.PRNGKey(0), False)
    assert np.isfinite(float(metrics["mse"]))
    # stage 2 on it: the AE's own frozen encoder is a jit argument of the latent model too
    latent = str(tmp_path / "latent")
    train(tiny_config(train_corpus, "cosmos", [f"--config.components.autoencoder.workdir={ae}",
                                               "--config.train.num_steps=2"]), latent)
    exp, params, _ = restore_for_inference(latent, load_workdir_config(latent))
    assert set(exp.family.frozen) == {"autoencoder", "autoencoder/encoder"}
    spec = SampleSpec("cosmos", 2, 32, steps=3, options=cosmos_sampling.CosmosOptions())
    tokens, _ = jax.jit(lambda p, f: exp.family.bind(f).sample(p, jax.random.PRNGKey(0), spec,
                                                               np.full(32, -1)))(params, exp.frozen)
    assert tokens.shape == (2, 32) and int(tokens.max()) < 256


def test_config_json_tuples_round_trip(autoencoder):
    config = load_workdir_config(autoencoder)
    assert config.cosmos_ae.eval_noise == (0.9, 0.7, 0.5)  # JSON gave a list
