"""The train loop: exact resume, NaN stop, corrupt-checkpoint fallback, workdir/model mismatch, learning."""

import os
import shutil

import pytest

from dlm_jax import config as config_lib
from dlm_jax.errors import UserError
from dlm_jax.train.loop import train
from dlm_jax.train.metrics import read_metrics
from tests.helpers import small_corpus, tiny_config

COMPARED = ("loss", "grad_norm", "learning_rate")


def _by_step(workdir):
    return {m["step"]: {k: m[k] for k in COMPARED} for m in read_metrics(workdir) if "loss" in m}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    workdir = str(tmp_path / "run")
    config = tiny_config(corpus, "mdlm", ["--config.train.num_steps=3"])
    train(config, workdir)
    exploding = config_lib.apply_overrides(config, ["--config.train.num_steps=9", "--config.train.learning_rate=1e30",
                                                    "--config.train.warmup_steps=0", "--config.train.grad_clip=0.0"])
    with pytest.raises(UserError, match=r"(loss|grad_norm) is (nan|inf).*last good checkpoint step 3 kept") as info:
        train(exploding, workdir)
    assert "\n" not in str(info.value)
    assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))
    # the kept checkpoint still trains on with a sane learning rate
    train(config_lib.apply_overrides(config, ["--config.train.num_steps=4"]), workdir)
    assert max(_by_step(workdir)) == 4


def _corrupt(step_dir):
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus, capsys):
    workdir = str(tmp_path / "run")
    config = tiny_config(corpus, "ar")
    train(config_lib.apply_overrides(config, ["--config.train.num_steps=6"]), workdir)
    reference = _by_step(workdir)
    _corrupt(os.path.join(workdir, "checkpoints", "6"))
    train(config_lib.apply_overrides(config, ["--config.train.num_steps=9"]), workdir)
    assert "unreadable checkpoint(s) step 6" in capsys.readouterr().err
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert "6.corrupt" in names and "9" in names  # set aside, never deleted
    resumed = _by_step(workdir)
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: reference[s] for s in (4, 5, 6)}


def test_all_checkpoints_unreadable_is_a_clear_error_and_nothing_is_moved(tmp_path, corpus):
    workdir = str(tmp_path / "run")
    config = tiny_config(corpus, "mdlm", ["--config.train.num_steps=3"])
    train(config, workdir)
    _corrupt(os.path.join(workdir, "checkpoints", "3"))
    with pytest.raises(UserError, match="no readable checkpoint"):
        train(config, workdir)
    assert os.listdir(os.path.join(workdir, "checkpoints")).count("3") == 1


def test_workdir_with_another_model_shape_is_refused(tmp_path, corpus):
    workdir = str(tmp_path / "run")
    train(tiny_config(corpus, "mdlm", ["--config.train.num_steps=1"]), workdir)
    with pytest.raises(UserError, match=r"another model \(model.d_model: 32 there, 64 now\)"):
        train(tiny_config(corpus, "mdlm", ["--config.model.d_model=64"]), workdir)


def test_a_few_steps_of_training_improve_val_likelihood(tmp_path, corpus):
    workdir = str(tmp_path / "run")
    config = tiny_config(corpus, "mdlm", [
        "--config.train.num_steps=80", "--config.train.eval_every=40", "--config.train.log_every=40",
        "--config.train.checkpoint_every=80", "--config.train.learning_rate=3e-3", "--config.train.ema_decay=0.0",
        "--config.eval.num_batches=4",
    ])
    train(config, workdir)
    evals = {m["step"]: m for m in read_metrics(workdir) if "val_bpc" in m}
    assert evals[80]["val_bpc"] < evals[40]["val_bpc"] < 8.0
    shutil.rmtree(workdir)
