"""train.init_from: an AR's trained params start a block diffusion run (exact copy, [MASK] rows fresh, optimizer
fresh, sharded like a fresh state); mismatches are one-line errors raised before the new workdir is written; a
resume ignores it."""

import os
import shutil

import jax
import numpy as np
import pytest

from dlm_jax.errors import UserError
from dlm_jax.experiment import build_experiment, load_workdir_config, restore_for_inference
from dlm_jax.train import init_from, sharding
from dlm_jax.train.loop import train
from dlm_jax.train.metrics import read_metrics
from dlm_jax.train.state import create_train_state
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def ar_workdir(tmp_path_factory, train_corpus):
    """A tiny AR trained 3 steps (EMA kept)."""
    workdir = str(tmp_path_factory.mktemp("ar") / "run")
    train(tiny_config(train_corpus, "ar", ["--config.train.num_steps=3"]), workdir)
    return workdir


def _flat(tree):
    return {path: np.asarray(leaf) for path, leaf in init_from.flat_params(tree).items()}


@pytest.mark.parametrize("num_devices", [1, 8])
def test_block_state_copies_the_ar_params_exactly_and_keeps_fresh_mask_rows(ar_workdir, train_corpus, num_devices):
    mesh = ["--config.mesh.fsdp=2"] if num_devices == 8 else []  # params sharded over fsdp on 8 fake devices
    config = tiny_config(train_corpus, "block", [f"--config.train.init_from={ar_workdir}", *mesh])
    exp = build_experiment(config, jax.devices()[:num_devices])
    source = init_from.load(exp)
    with sharding.mesh_context(exp.mesh):
        state = init_from.create_state(exp, source)
        fresh = create_train_state(exp.family.init_params, exp.optimizer, config, exp.state_shardings)
    _, ar_params, step = restore_for_inference(ar_workdir, load_workdir_config(ar_workdir))
    assert (source.family, source.step, step) == ("ar", 3, 3)
    ar, new, init = _flat(ar_params), _flat(state.params), _flat(fresh.params)
    assert ar.keys() == new.keys()
    vocab = exp.tokenizer.vocab_size
    for key, value in new.items():
        if key == "embed/embedding":  # [V + 1, D]: the AR's rows, then [MASK]'s fresh row
            np.testing.assert_array_equal(value[:vocab], ar[key])
            np.testing.assert_array_equal(value[vocab:], init[key][vocab:])
            assert value.shape[0] == vocab + 1
        elif key == "head/kernel":  # [D, V + 1]: the AR's columns, then [MASK]'s fresh (zero) column
            np.testing.assert_array_equal(value[:, :vocab], ar[key])
            np.testing.assert_array_equal(value[:, vocab:], init[key][:, vocab:])
        else:
            np.testing.assert_array_equal(value, ar[key])
    assert not np.array_equal(new["embed/embedding"][:vocab], init["embed/embedding"][:vocab])
    jax.tree.map(np.testing.assert_array_equal, state.ema_params, state.params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh.opt_state)  # fresh optimizer
    assert int(state.step) == 0
    assert jax.tree.map(lambda x: x.sharding, state) == exp.state_shardings
    assert source.num_new_ids == 1


def test_train_from_ar_writes_nothing_on_bad_input_and_a_resume_ignores_init_from(ar_workdir, train_corpus,
                                                                                     tmp_path, capsys):
    workdir = str(tmp_path / "block")
    with pytest.raises(UserError, match="has no config.json") as info:
        train(tiny_config(train_corpus, "block", [f"--config.train.init_from={tmp_path / 'nope'}"]), workdir)
    assert str(info.value).startswith(f"train.init_from='{tmp_path / 'nope'}': ") and "\n" not in str(info.value)
    assert not os.path.exists(workdir)  # validated before anything is written

    train(tiny_config(train_corpus, "block", [f"--config.train.init_from={ar_workdir}",
                                              "--config.train.num_steps=2"]), workdir)
    out = capsys.readouterr().out
    assert f"initialised from {ar_workdir} (ar, step 3): copied" in out and "1 new vocabulary id(s)" in out
    # a resume restores its own checkpoint and never reads init_from (here a path that does not exist)
    train(tiny_config(train_corpus, "block", [f"--config.train.init_from={tmp_path / 'nope'}",
                                              "--config.train.num_steps=3"]), workdir)
    out = capsys.readouterr().out
    assert "resumed from" in out and "initialised from" not in out
    assert max(m["step"] for m in read_metrics(workdir) if "loss" in m) == 3
    train(tiny_config(train_corpus, "block", ["--config.train.num_steps=3"]), workdir)  # finished: says so
    assert "already trained to step 3 (train.num_steps=3): nothing to do" in capsys.readouterr().out


def test_untrained_source_is_refused(ar_workdir, train_corpus, tmp_path):
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(os.path.join(ar_workdir, "config.json"), untrained / "config.json")
    config = tiny_config(train_corpus, "block", [f"--config.train.init_from={untrained}"])
    with pytest.raises(UserError, match=r"^train.init_from=.*: no checkpoint in .*; train first"):
        init_from.load(build_experiment(config))


@pytest.mark.parametrize("family,overrides,message", [
    ("block", ["--config.model.d_model=64"],
     r"params differ at embed/embedding: \(258, 32\) there, \(259, 64\) here \(model.d_model: 32 there, 64 here\); "
     r"use the same model.\* sizes"),
    ("mdlm", ["--config.model.time_conditioning=true"],
     r"params differ: final_adaln/\S+ is here but not there \(model.time_conditioning: False there, True here\)"),
    ("block", ["--config.model.scan_layers=false"], r"params differ: layer_0/\S+ is here but not there"),
    ("ar", ["--config.data.tokenizer=char"], r"another tokenizer .*use the same data.tokenizer"),
])
def test_mismatches_are_one_line_errors_naming_the_key(ar_workdir, train_corpus, family, overrides, message):
    config = tiny_config(train_corpus, family, [f"--config.train.init_from={ar_workdir}", *overrides])
    with pytest.raises(UserError, match=message) as info:
        init_from.load(build_experiment(config))
    assert str(info.value).startswith(f"train.init_from='{ar_workdir}': ") and "\n" not in str(info.value)
