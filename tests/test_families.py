"""Contract tests over every registered family (the registry, so a new family is tested by being registered; the
test-only `toy` family of tests/toy_family.py runs here too): finite loss and grads, exact resume, 8-device
sharded == 1 device, every sampler keeps the template's known tokens and leaves no [MASK], and
train -> eval -> sample through the CLI. Frozen components are trained here from their first accepted family."""

import json
import os

import jax
import numpy as np
import pytest

from dlm_jax import config as config_lib
from dlm_jax import families, main
from dlm_jax.errors import UserError
from dlm_jax.experiment import (
    build_experiment,
    load_component,
    load_sampler_components,
    load_workdir_config,
    restore_for_inference,
)
from dlm_jax.sampling.loop import SampleSpec
from dlm_jax.train import sharding
from dlm_jax.train.loop import train
from dlm_jax.train.metrics import read_metrics
from dlm_jax.train.state import create_train_state
from tests.helpers import tiny_config

FAMILIES = sorted(families.FAMILIES)
COMPARED = ("loss", "grad_norm", "learning_rate")


@pytest.fixture(scope="module")
def corpus(train_corpus):
    return train_corpus


@pytest.fixture(scope="module")
def component_workdirs(tmp_path_factory, corpus):
    """One tiny trained workdir per component name any family or sampler needs (of the first family it accepts)."""
    root = tmp_path_factory.mktemp("components")
    out = {}
    for cls in families.FAMILIES.values():
        sampler_components = [c for entry in cls.samplers.values() for c in entry.components]
        for name, accepted in [*cls.component_families.items(), *sampler_components]:
            if name not in out:
                out[name] = str(root / name)
                train(tiny_config(corpus, accepted[0], ["--config.train.num_steps=2"]), out[name])
    return out


def _overrides(family, component_workdirs, extra=()):
    components = [f"--config.components.{name}.workdir={component_workdirs[name]}"
                  for name in families.get(family).component_families]
    return [*components, *extra]


def _config(corpus, family, component_workdirs, extra=()):
    return tiny_config(corpus, family, _overrides(family, component_workdirs, extra))


def _loss_and_grads(config, devices):
    exp = build_experiment(config, devices)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, exp.tokenizer.vocab_size, (8, 32)).astype(np.int32),
             "loss_mask": np.ones((8, 32), np.float32)}
    with sharding.mesh_context(exp.mesh):
        state = create_train_state(exp.family.init_params, exp.optimizer, config, exp.state_shardings)
        batch = sharding.global_batch(batch, sharding.batch_sharding(exp.mesh))

        def loss(params, frozen):
            return exp.family.bind(frozen).loss(params, batch, jax.random.PRNGKey(1), True)[0]

        fn = jax.jit(jax.value_and_grad(loss), in_shardings=(exp.state_shardings.params, exp.frozen_shardings()))
        value, grads = fn(state.params, exp.frozen)
    return state.params, jax.device_get(value), jax.device_get(grads)


TIME_CONDITIONED = ("mdlm", ("--config.model.time_conditioning=true",))  # the adaLN path, sharded too


@pytest.mark.parametrize("family,extra", [(f, ()) for f in FAMILIES] + [TIME_CONDITIONED])
def test_loss_and_grads_are_finite_and_sharded_equals_one_device(corpus, component_workdirs, family, extra):
    assert jax.device_count() == 8
    one = _config(corpus, family, component_workdirs, ["--config.mesh.data=1", *extra])
    _, loss1, grads1 = _loss_and_grads(one, jax.devices()[:1])
    assert np.isfinite(loss1) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads1))
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads1))
    eight = _config(corpus, family, component_workdirs, ["--config.mesh.data=2", "--config.mesh.fsdp=4", *extra])
    params8, loss8, grads8 = _loss_and_grads(eight, jax.devices())
    assert any(len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.shape != x.shape
               for x in jax.tree.leaves(params8)), "no param is split over the fsdp axis"
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads8, grads1)


def _by_step(workdir):
    return {m["step"]: {k: m[k] for k in COMPARED} for m in read_metrics(workdir) if "loss" in m}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_after_interruption_reproduces_uninterrupted_metrics(tmp_path, corpus, component_workdirs, family):
    config = _config(corpus, family, component_workdirs, ["--config.mesh.data=2", "--config.mesh.fsdp=4"])
    train(config, str(tmp_path / "straight"))
    interrupted = str(tmp_path / "interrupted")
    train(config_lib.apply_overrides(config, ["--config.train.num_steps=3"]), interrupted)
    train(config, interrupted)  # resumes from step 3: params, optimizer, EMA, data iterator
    straight, resumed = _by_step(str(tmp_path / "straight")), _by_step(interrupted)
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert straight == resumed  # exact, not approximate
    saved = json.load(open(os.path.join(interrupted, "config.json")))
    for name, workdir in component_workdirs.items():  # components: recorded, never in the checkpoint
        if name in families.get(family).component_families:
            assert saved["components"][name]["workdir"] == workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, component_workdirs):
    """Every family trained 2 steps in-process (for the sampler contract)."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for family in FAMILIES:
        out[family] = str(root / family)
        train(_config(corpus, family, component_workdirs, ["--config.train.num_steps=2"]), out[family])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_sampler_keeps_known_tokens_and_leaves_no_mask(trained, component_workdirs, family):
    exp, params, _ = restore_for_inference(trained[family], load_workdir_config(trained[family]))
    templates = [np.array([84, 111, 32] + [-1] * 13, np.int32), np.array([-1] * 4 + [97, 98] + [-1] * 10, np.int32)]
    if not exp.family.samplers:  # a family that does not generate (Cosmos's autoencoder) says so in one line
        with pytest.raises(UserError, match="does not generate text"):
            exp.family.default_sampler  # noqa: B018
        return
    for sampler, entry in exp.family.samplers.items():
        ran = 0
        for template in templates:
            workdirs = {name: component_workdirs[name] for name, _ in entry.components}  # e.g. DiffuSpec's verifier
            spec = SampleSpec(sampler, 2, 16, steps=8, options=entry.options(**workdirs))
            load_sampler_components(exp, spec)
            try:
                exp.family.check_sample(spec, template)
            except UserError:
                assert template[0] < 0, f"{family}/{sampler} refuses a plain prompt"
                continue  # e.g. AR cannot infill
            with sharding.mesh_context(exp.mesh):
                tokens, stats = jax.jit(lambda p, f, r, spec=spec, template=template: exp.family.bind(f).sample(
                    p, r, spec, template))(params, exp.frozen, jax.random.PRNGKey(0))
            tokens = np.asarray(tokens)
            known = template >= 0
            assert tokens.shape == (2, 16)
            np.testing.assert_array_equal(tokens[:, known], np.broadcast_to(template[known], (2, known.sum())))
            assert tokens.min() >= 0 and tokens.max() < exp.tokenizer.vocab_size, f"{family}/{sampler}: [MASK] left"
            assert int(stats["nfe"]) >= 1
            ran += 1
        assert ran >= 1


def _cli(capsys, *argv):
    main.main(list(argv))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_train_eval_sample_through_the_cli(tmp_path, capsys, corpus, component_workdirs, family):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("from dlm_jax.families import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                      f"    c.model.family = {family!r}\n    return c\n")
    workdir = str(tmp_path / "run")
    tiny = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
            "--config.model.mlp_dim=64", "--config.data.source=text_files", f"--config.data.path={corpus}",
            "--config.data.seq_len=32", "--config.train.batch_size=8", "--config.eval.batch_size=8",
            "--config.train.num_steps=2", "--config.train.eval_every=2", "--config.eval.num_batches=2"]
    result = _cli(capsys, "train", f"--config={recipe}", f"--workdir={workdir}", *tiny,
                  *_overrides(family, component_workdirs))
    assert result["workdir"] == workdir and np.isfinite(result["loss"])
    metric = families.get(family).metric_name or "loss"
    assert f"val_{metric}" in result
    result = _cli(capsys, "eval", f"--workdir={workdir}")
    assert result["metric"] == metric and result["step"] == 2 and np.isfinite(result[metric])
    if not families.get(family).samplers:
        with pytest.raises(SystemExit) as exit_info:
            main.main(["sample", f"--workdir={workdir}", "--num_samples=2", "--length=16", "--prompt=To"])
        assert exit_info.value.code == 2 and "does not generate text" in capsys.readouterr().err
        return
    stats = _cli(capsys, "sample", f"--workdir={workdir}", "--num_samples=2", "--length=16", "--steps=4",
                 "--prompt=To")
    assert stats["family"] == family and stats["sampler"] == next(iter(families.get(family).samplers))
    samples = [json.loads(line) for line in open(stats["output"])]
    assert len(samples) == 2 and all(s["text"].startswith("To") and len(s["tokens"]) == 16 for s in samples)


def test_component_errors_name_the_key(tmp_path, corpus, component_workdirs):
    with pytest.raises(UserError, match=r"needs --config.components.teacher.workdir=WORKDIR \(a trained ar workdir"):
        families.validate(tiny_config(corpus, "toy"))
    with pytest.raises(UserError, match=r"components.teacher.workdir='/no/such': .*has no config.json"):
        load_component("/no/such", "teacher", ("ar",))
    mdlm = str(tmp_path / "mdlm")
    train(tiny_config(corpus, "mdlm", ["--config.train.num_steps=1"]), mdlm)
    with pytest.raises(UserError, match="components.teacher.workdir=.*holds a 'mdlm' model, this slot takes ar"):
        build_experiment(tiny_config(corpus, "toy", [f"--config.components.teacher.workdir={mdlm}"]))
    char_ar = str(tmp_path / "char_ar")  # every family: a component must share the model's tokenizer
    train(tiny_config(corpus, "ar", ["--config.train.num_steps=1", "--config.data.tokenizer=char"]), char_ar)
    with pytest.raises(UserError, match=r"components.teacher.workdir=.*char_ar' uses another tokenizer"):
        build_experiment(tiny_config(corpus, "toy", [f"--config.components.teacher.workdir={char_ar}"]))
