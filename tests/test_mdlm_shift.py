"""MDLM adapted from AR (Dream / DiffuLLaMA): shifted logits (z_l predicted from the output at l - 1 on [BOS] + z),
the causal-to-full annealed training mask, and a shifted, annealed MDLM that trains, evaluates and samples."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import config as config_lib
from dlm_jax import families
from dlm_jax.diffusion.autoregressive import shift_right
from dlm_jax.errors import UserError
from dlm_jax.experiment import build_experiment, load_workdir_config, restore_for_inference
from dlm_jax.kernels import attention, reference
from dlm_jax.sampling.loop import SampleSpec
from dlm_jax.train import init_from, sharding
from dlm_jax.train.loop import train
from dlm_jax.train.metrics import read_metrics
from tests.helpers import StubTokenizer, tiny_config

VOCAB = 13  # 12 tokens + [MASK]
MASK = VOCAB - 1
BOS = 5  # the stub tokenizer's EOS id: the AR's start token


def _family(shift=True, anneal_steps=0, **model):
    c = families.base_config()
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 32, 4, 64
    for key, value in model.items():
        c.model[key] = value
    c.mdlm.shift_logits, c.mdlm.anneal_steps = shift, anneal_steps
    fam = families.get("mdlm")(c, StubTokenizer(VOCAB - 1, eos_id=BOS), {})
    params = fam.init_params(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    return fam, params


def _z(batch=2, length=16):
    x = jax.random.randint(jax.random.PRNGKey(3), (batch, length), 0, VOCAB - 1)
    return jnp.where(jax.random.uniform(jax.random.PRNGKey(4), x.shape) < 0.5, MASK, x)  # [B, L] with [MASK]s


def _backbone(fam, params, tokens, **kwargs):
    return fam.model.apply({"params": params}, tokens, None, **kwargs)


def test_shifted_logits_are_the_backbone_on_bos_plus_z_one_position_earlier():
    fam, params = _family(shift=True)
    z = _z()
    got = fam.logits_fn(params, jax.random.PRNGKey(0), train=False)(z)
    with_bos = jnp.concatenate([jnp.full((2, 1), BOS), z], axis=1)  # [B, L + 1]
    np.testing.assert_allclose(got, _backbone(fam, params, with_bos)[:, :16], rtol=1e-5, atol=1e-5)
    unshifted = _family(shift=False)[0].logits_fn(params, jax.random.PRNGKey(0), train=False)(z)
    np.testing.assert_allclose(unshifted, _backbone(fam, params, z), rtol=1e-5, atol=1e-5)
    assert got.shape == unshifted.shape == (2, 16, VOCAB)


def test_anneal_mask_goes_from_causal_to_full():
    causal = np.tril(np.ones((64, 64), bool))
    rng = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(reference.anneal_mask(rng, jnp.float32(0.0), 64), causal)
    assert np.all(reference.anneal_mask(rng, jnp.float32(1.0), 64))
    half = np.asarray(reference.anneal_mask(rng, jnp.float32(0.5), 64))
    assert np.all(half[causal])  # a superset of causal
    extra = half[~causal].mean()  # 2016 pairs above the diagonal, each allowed w.p. 0.5
    assert 0.45 < extra < 0.55
    assert not np.array_equal(half, np.asarray(reference.anneal_mask(jax.random.PRNGKey(1), jnp.float32(0.5), 64)))


def test_explicit_mask_is_xla_only_and_restricts_the_mode():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 8, 2, 8)) for i in range(3))
    causal = jnp.tril(jnp.ones((8, 8), bool))
    np.testing.assert_allclose(attention.attention(q, k, v, "full", "xla", mask=causal),
                               reference.attention(q, k, v, "causal"), rtol=1e-6)
    with pytest.raises(ValueError, match="explicit attention mask .* needs attention_impl auto or xla"):
        attention.attention(q, k, v, "full", "pallas_interpret", mask=causal)


def test_training_attention_anneals_and_eval_is_full():
    """Step 0: causal on [BOS] + z (the AR exactly); step >= anneal_steps, eval (train=False) and no step: full."""
    fam, params = _family(shift=True, anneal_steps=10)
    z, rng = _z(), jax.random.PRNGKey(0)
    with_bos = jnp.concatenate([jnp.full((2, 1), BOS), z], axis=1)
    causal = _backbone(fam, params, with_bos, mask_mode="causal")[:, :16]
    full = _backbone(fam, params, with_bos)[:, :16]
    logits = jax.jit(lambda step, z: fam.logits_fn(params, rng, train=True, step=step)(z))
    np.testing.assert_allclose(logits(jnp.int32(0), z), causal, rtol=1e-5, atol=1e-5)
    for step in (10, 11):
        np.testing.assert_allclose(logits(jnp.int32(step), z), full, rtol=1e-5, atol=1e-5)
    between = logits(jnp.int32(5), z)
    assert not np.allclose(between, causal, atol=1e-4) and not np.allclose(between, full, atol=1e-4)
    for fn in (fam.logits_fn(params, rng, train=False, step=jnp.int32(0)), fam.logits_fn(params, rng, train=True)):
        np.testing.assert_allclose(fn(z), full, rtol=1e-5, atol=1e-5)
    batch = {"tokens": jnp.where(z == MASK, 0, z), "loss_mask": jnp.ones((2, 16))}  # eval ignores a step
    np.testing.assert_allclose(fam.loss(params, {**batch, "step": jnp.int32(0)}, rng, False)[0],
                               fam.loss(params, batch, rng, False)[0], rtol=1e-6)


def test_shifted_input_length_runs_on_the_pallas_kernels():
    """L + 1 = 17 inputs: the flash kernels pad to their tiles (kernels/pallas_tiles.py)."""
    fam, params = _family(shift=True, attention_impl="pallas_interpret")
    xla = dataclasses.replace(fam.model.cfg, attention_impl="xla")
    z = _z(batch=1)
    got = fam.logits_fn(params, jax.random.PRNGKey(0), train=False)(z)
    want = type(fam.model)(xla).apply({"params": params}, jnp.concatenate([jnp.full((1, 1), BOS), z], 1))[:, :16]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_config_checks():
    base = families.base_config()
    with pytest.raises(UserError, match="'mdlm.anneal_steps' must be >= 0"):
        families.validate(config_lib.apply_overrides(base, ["--config.mdlm.anneal_steps=-1"]))
    with pytest.raises(UserError, match="attention_impl auto or xla only"):
        families.validate(config_lib.apply_overrides(base, ["--config.mdlm.anneal_steps=5",
                                                            "--config.model.attention_impl=pallas_interpret"]))
    fam, _ = _family(shift=True)
    for sampler in ("prefix_cache", "dual_cache"):
        with pytest.raises(UserError, match=f"{sampler} indexes its KV caches by position.*--sampler=semi_ar"):
            fam.check_sample(SampleSpec(sampler, 1, 16, steps=16), np.full(16, -1))


@pytest.fixture(scope="module")
def shifted_workdir(tmp_path_factory, train_corpus):
    workdir = str(tmp_path_factory.mktemp("shifted") / "run")
    config = tiny_config(train_corpus, "mdlm", [
        "--config.mdlm.shift_logits=true", "--config.mdlm.anneal_steps=4", "--config.train.num_steps=8",
        "--config.train.checkpoint_every=8", "--config.train.learning_rate=1e-2", "--config.train.ema_decay=0.0"])
    train(config, workdir)
    return config, workdir


def test_shifted_annealed_mdlm_trains(shifted_workdir):
    _, workdir = shifted_workdir
    losses = [m["loss"] for m in read_metrics(workdir) if "loss" in m]
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


@pytest.mark.parametrize("sampler", ["semi_ar", "ancestral"])
def test_shifted_mdlm_samples_keep_known_tokens(shifted_workdir, sampler):
    config, workdir = shifted_workdir
    exp, params, _ = restore_for_inference(workdir, config)
    template = np.full(32, -1)
    template[:4], template[20:24] = [84, 104, 101, 32], [97, 110, 100, 32]  # "The " prompt, "and " infill
    spec = SampleSpec(sampler, 2, 32, steps=8)
    exp.family.check_sample(spec, template)
    tokens, _ = exp.family.sample(params, jax.random.PRNGKey(0), spec, template)
    tokens = np.asarray(tokens)
    assert tokens.shape == (2, 32) and not np.any(tokens == exp.family.mask_id)
    np.testing.assert_array_equal(tokens[:, template >= 0], np.broadcast_to(template[template >= 0], (2, 8)))


def test_a_shifted_checkpoint_is_not_read_unshifted(shifted_workdir):
    config, workdir = shifted_workdir
    unshifted = config_lib.apply_overrides(config, ["--config.mdlm.shift_logits=false"])
    with pytest.raises(UserError, match=r"another model \(mdlm.shift_logits: True there, False now\)"):
        restore_for_inference(workdir, unshifted)
    with pytest.raises(UserError, match=r"mdlm.shift_logits"):
        train(unshifted, workdir)


def test_adapted_from_an_ar_the_first_annealed_step_predicts_clean_tokens_as_the_ar(tmp_path, train_corpus):
    """train.init_from copies the AR; with shift_logits at step 0 (causal attention) the MDLM's logits of a clean
    sequence are the AR's next-token logits (plus the [MASK] logit of its fresh, zero head column)."""
    ar_workdir = str(tmp_path / "ar")
    train(tiny_config(train_corpus, "ar", ["--config.train.num_steps=2"]), ar_workdir)
    config = tiny_config(train_corpus, "mdlm", [f"--config.train.init_from={ar_workdir}",
                                                "--config.mdlm.shift_logits=true", "--config.mdlm.anneal_steps=10"])
    exp = build_experiment(config, jax.devices()[:1])
    with sharding.mesh_context(exp.mesh):
        params = init_from.create_state(exp, init_from.load(exp)).params
    ar, ar_params, _ = restore_for_inference(ar_workdir, load_workdir_config(ar_workdir), jax.devices()[:1])
    x = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, exp.tokenizer.vocab_size)
    rng = jax.random.PRNGKey(1)
    got = exp.family.logits_fn(params, rng, train=True, step=jnp.int32(0))(x)
    want = ar.family.logits_fn(ar_params, rng, train=False)(shift_right(x, ar.family.bos_id))
    np.testing.assert_allclose(got[..., :-1], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., -1], 0.0)
