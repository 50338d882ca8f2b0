"""The `dlm-jax` CLI as a user runs it: train -> eval -> sample, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import small_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.data.seq_len=32", "--config.train.batch_size=8",
        "--config.eval.batch_size=8", "--config.train.log_every=2", "--config.train.checkpoint_every=4",
        "--config.eval.num_batches=2", "--config.mesh.data=-1"]


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "dlm_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"dlm-jax {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_train_eval_sample_end_to_end(tmp_path, corpus, family):
    workdir = str(tmp_path / family)
    config = "configs/shakespeare_mdlm.py" if family == "mdlm" else "configs/shakespeare_ar.py"
    out = run("train", f"--config={config}", f"--workdir={workdir}", f"--config.data.path={corpus}",
              "--config.train.num_steps=4", "--config.train.eval_every=4", *TINY)
    assert last_json(out.stdout)["workdir"] == workdir
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {"step", "loss", "learning_rate", "tokens_per_second"} <= set(records[0])
    assert any("val_bpc" in r for r in records)
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    result = last_json(run("eval", f"--workdir={workdir}").stdout)
    assert {"step", "nelbo", "ppl", "bits_per_token", "num_tokens", "bpc"} <= set(result)
    assert result["step"] == 4 and result["num_tokens"] == 2 * 8 * 32 and 0 < result["nelbo"] < 10

    out = run("sample", f"--workdir={workdir}", "--num_samples=2", "--steps=8", "--length=16")
    stats = last_json(out.stdout)
    assert {"sampler", "steps", "nfe", "num_samples", "length", "seconds", "tokens_per_second"} <= set(stats)
    assert stats["num_samples"] == 2 and stats["length"] == 16
    assert stats["nfe"] == (9 if family == "mdlm" else 16)
    assert out.stdout.count("--- sample") == 2


def test_quickstart_config_runs_on_the_embedded_corpus(tmp_path):
    out = run("train", "--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.train.num_steps=2",
              "--config.data.max_documents=40", "--config.train.eval_every=2", *TINY)
    assert "val_nelbo" in last_json(out.stdout)


def _assert_one_line_error(proc, message):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.train.num_stepz=3"], "unknown config key 'train.num_stepz'"),
        (["--config.train.num_steps=three"], "'train.num_steps' wants a int"),
        (["--config.data.path=/no/such/file.txt"], "/no/such/file.txt"),
        (["--config.data.seq_len=100000"], "seq_len"),
        (["--config.mesh.data=3", "--config.mesh.fsdp=1"], "mesh"),
        (["--config.model.d_model=33"], "not divisible by model.num_heads"),
    ],
)
def test_bad_input_is_one_line(tmp_path, corpus, extra, message):
    args = ["train", "--config=configs/shakespeare_mdlm.py", f"--workdir={tmp_path}", f"--config.data.path={corpus}"]
    _assert_one_line_error(run(*args, *TINY, *extra, check=False), message)
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_eval_and_sample_on_an_empty_workdir_are_one_line_errors(tmp_path):
    _assert_one_line_error(run("eval", f"--workdir={tmp_path}", check=False), "no config.json")
    _assert_one_line_error(run("sample", f"--workdir={tmp_path}", check=False), "no config.json")
    _assert_one_line_error(run("train", "--config=configs/nope.py", f"--workdir={tmp_path}", check=False), "not found")
