"""Workdir integrity: one trainer per workdir, metrics.jsonl and TensorBoard rolled back to the restored step, a
torn metrics line, a config.json missing a key, a failed checkpoint save; and the train loop's plain log lines."""

import glob
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from dlm_jax import config as config_lib
from dlm_jax import experiment
from dlm_jax.errors import UserError
from dlm_jax.train.loop import train
from dlm_jax.train.metrics import read_metrics
from dlm_jax.train.workdir_lock import WorkdirLock
from tests.helpers import ROOT, tiny_config

TINY = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.data.seq_len=32", "--config.train.batch_size=8",
        "--config.eval.batch_size=8", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.mesh.data=-1"]
COMPARED = ("loss", "grad_norm", "learning_rate")


def _cli_train(corpus, workdir, *extra):
    return [sys.executable, "-m", "dlm_jax.main", "train", "--config=configs/shakespeare_mdlm.py",
            f"--workdir={workdir}", f"--config.data.path={corpus}", *TINY, *extra]


def _run(args):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc, *parts):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(p in lines[-1] for p in parts), proc.stderr
    assert "Traceback" not in proc.stderr


def _steps(workdir):
    return [m["step"] for m in read_metrics(workdir) if "loss" in m]


def _by_step(workdir):
    return {m["step"]: {k: m[k] for k in COMPARED} for m in read_metrics(workdir) if "loss" in m}


def _tensorboard_steps(workdir, tag="loss"):
    """The steps of every `tag` scalar in WORKDIR/tensorboard's event files (TFRecord framing read here)."""
    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "*tfevents*"))):
        data, offset = open(path, "rb").read(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            steps += [event.step for value in event.summary.value if value.tag == tag]
            offset += 12 + length + 4
    return sorted(steps)


@pytest.fixture(scope="module")
def config(train_corpus):
    """6 steps, every step logged, checkpoints at 3 and 6."""
    return tiny_config(train_corpus, "mdlm")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, config):
    """A workdir trained 6 steps in one go: the reference."""
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    train(config, workdir)
    return workdir


def test_a_second_trainer_is_refused_and_writes_nothing(tmp_path, train_corpus):
    workdir = str(tmp_path / "run")
    lock = WorkdirLock(workdir)
    lock.acquire()  # "the first trainer": this test process
    record = open(os.path.join(workdir, "train.lock")).read()
    assert record.split()[0] == str(os.getpid())
    proc = _run(_cli_train(train_corpus, workdir, "--config.train.num_steps=2"))
    _assert_one_line_error(proc, repr(workdir), f"pid {os.getpid()}", "in use by another trainer")
    assert os.listdir(workdir) == ["train.lock"] and open(os.path.join(workdir, "train.lock")).read() == record
    lock.release()

    proc = _run(_cli_train(train_corpus, workdir, "--config.train.num_steps=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # not a terminal: plain log lines, no tqdm bar; the first step's row has no throughput (it compiled)
    assert "step 1/2: loss" in proc.stdout and "step 2/2: loss" in proc.stdout and "tok/s" in proc.stdout
    assert "checkpoint saved at step 2" in proc.stdout and "\r" not in proc.stderr
    rows = read_metrics(workdir)
    assert "tokens_per_second" not in rows[0] and rows[1]["tokens_per_second"] > 0
    assert open(os.path.join(workdir, "train.lock")).read() == ""  # released


def test_a_killed_trainer_leaves_no_stale_lock_and_its_rows_are_dropped(tmp_path, train_corpus):
    """SIGKILL before the first checkpoint: the kernel dropped the lock, and the fresh start logs each step once."""
    workdir = str(tmp_path / "run")
    args = _cli_train(train_corpus, workdir, "--config.train.checkpoint_every=1000")
    proc = subprocess.Popen([*args, "--config.train.num_steps=500"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics, start = os.path.join(workdir, "metrics.jsonl"), time.time()
    while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - start < 240, "training did not start in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert open(os.path.join(workdir, "train.lock")).read().split()[0] == str(proc.pid)  # left behind, unlocked
    again = _run([*args, "--config.train.num_steps=4"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert _steps(workdir) == [1, 2, 3, 4] and _tensorboard_steps(workdir) == [1, 2, 3, 4]


def test_resume_rolls_back_metrics_and_tensorboard_and_drops_a_torn_line(tmp_path, config, straight, capsys):
    """A crash after the checkpoint at step 3 (checkpoint 6 gone, a half-written metrics line): the resumed run
    logs steps 4-6 again, each step appears once in metrics.jsonl and in TensorBoard, and resume is exact."""
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    assert _tensorboard_steps(workdir) == [1, 2, 3, 4, 5, 6]
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "loss": 1.2')
    train(config, workdir)
    assert "torn last line" in capsys.readouterr().err
    assert _steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert _tensorboard_steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert _tensorboard_steps(workdir, "grad_norm") == [1, 2, 3, 4, 5, 6]
    assert _by_step(workdir) == _by_step(straight)


def test_read_metrics_drops_a_torn_last_line_and_refuses_a_broken_one_inside(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert capsys.readouterr().err.count("\n") == 1
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_metrics(str(tmp_path))


def test_config_json_missing_a_key_is_named_not_the_checkpoint(tmp_path, config, capsys):
    workdir = tmp_path / "run"
    saved = json.loads(config_lib.to_json(config))
    del saved["model"]["d_model"], saved["train"]["warmup_steps"], saved["block"]  # edited; another family's section
    saved["model"]["t_eps"] = saved["mdlm"].pop("t_eps")  # an older layout: moved on load, not missing
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(saved))

    loaded = experiment.load_workdir_config(str(workdir))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "has no key(s) model.d_model, train.warmup_steps; using their defaults" in err
    assert loaded.mdlm.t_eps == config.mdlm.t_eps
    with pytest.raises(UserError) as info:
        experiment.check_workdir_matches(config, str(workdir))
    message = str(info.value)
    assert message.startswith(f"{workdir / 'config.json'} has no key 'model.d_model' (edited or truncated?); restore")
    assert "another model" not in message
    assert capsys.readouterr().err == ""  # the check itself does not warn again


def _failing_commit(monkeypatch, error):
    """Orbax's commit of a checkpoint's temporary directory (in its background save thread) raises `error` for
    steps after 3, as a full disk would."""
    from orbax.checkpoint._src.path import atomicity

    real = atomicity.on_commit_callback

    async def commit(tmp_dir, **kwargs):
        if int(os.path.basename(str(tmp_dir.get_final()))) > 3:
            raise error
        return await real(tmp_dir, **kwargs)

    monkeypatch.setattr(atomicity, "on_commit_callback", commit)


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    ValueError("RESOURCE_EXHAUSTED: Error writing \"params.x/0.0.0\" in OCDBT database at local file \"/w\": Failed "
               "to write 64321 bytes to file 7: No space left on device [os_error_code='28']"),  # tensorstore's
], ids=["oserror", "tensorstore"])
def test_a_failed_checkpoint_save_stops_training_and_keeps_the_last_good_one(
        tmp_path, config, straight, monkeypatch, capsys, caplog, error):
    workdir = str(tmp_path / "run")
    _failing_commit(monkeypatch, error)
    with caplog.at_level(logging.INFO), pytest.raises(UserError) as info:
        train(config, workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert str(info.value) == (
        f"checkpoint save at step 6 failed (OSError: [Errno 28] No space left on device); the last good checkpoint "
        f"(step 3) is kept in {ckpt_dir}; free space and rerun to resume")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # orbax's own error logs are silenced
    out = capsys.readouterr()
    assert "checkpoint saved at step 3" in out.out and "checkpoint saved at step 6" not in out.out
    assert "Traceback" not in out.err
    assert sorted(d for d in os.listdir(ckpt_dir) if d.isdigit()) == ["3"]

    monkeypatch.undo()
    train(config, workdir)  # space freed: resumes from step 3, exactly
    assert "resumed from" in capsys.readouterr().out
    assert _steps(workdir) == [1, 2, 3, 4, 5, 6] and _by_step(workdir) == _by_step(straight)
