"""Scale-out: 2 local processes (gloo CPU collectives) == 1 process, preemption by SIGTERM and kill -9 with exact
resume, the ahead-of-time compile check on a fake 8-device mesh, and the relaunch with host memory on huge pages."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, small_corpus

TINY = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.data.seq_len=32", "--config.train.batch_size=8",
        "--config.eval.batch_size=8", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.warmup_steps=2"]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train_cmd(corpus, workdir, *extra):
    return [sys.executable, "-m", "dlm_jax.main", "train", "--config=configs/shakespeare_mdlm.py",
            f"--workdir={workdir}", f"--config.data.path={corpus}", *TINY, *extra]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def test_two_processes_equal_one_process(tmp_path, corpus):
    one = str(tmp_path / "one")
    subprocess.run(_train_cmd(corpus, one, "--config.train.num_steps=4", "--config.mesh.data=1"), cwd=ROOT,
                   env=_env(1), check=True, capture_output=True, timeout=300)
    two = str(tmp_path / "two")
    proc = subprocess.run(["bash", "launch/local.sh", "--num_processes=2", "--",
                           *_train_cmd(corpus, two, "--config.train.num_steps=4", "--config.mesh.data=2")],
                          cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref, got = _losses(one), _losses(two)
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5)


def _wait_for_step(path, step, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-2000:]}")
        if os.path.exists(path) and any(r.get("step", 0) >= step for r in map(json.loads, open(path))):
            return
        time.sleep(0.2)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_preemption_saves_and_resume_is_exact(tmp_path, corpus, how):
    steps = ["--config.train.num_steps=150", "--config.train.checkpoint_every=10"]
    straight = str(tmp_path / "straight")
    subprocess.run(_train_cmd(corpus, straight, *steps), cwd=ROOT, env=_env(1), check=True, capture_output=True,
                   timeout=300)
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(_train_cmd(corpus, workdir, *steps), cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(os.path.join(workdir, "metrics.jsonl"), 23, proc)
    proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    if how == "sigterm":
        assert proc.returncode == 0, err[-2000:]
        stopped = json.loads(out.strip().splitlines()[-1])["preempted_at_step"]
        assert "preempted (SIGTERM) at step" in err
        assert saved[-1] == stopped and 23 <= stopped < 150
    else:
        assert proc.returncode == -signal.SIGKILL and saved and saved[-1] % 10 == 0
    subprocess.run(_train_cmd(corpus, workdir, *steps), cwd=ROOT, env=_env(1), check=True, capture_output=True,
                   timeout=300)
    assert _losses(workdir) == _losses(straight)  # exact, every step


def test_compile_check_on_a_fake_8_device_mesh(corpus):
    proc = subprocess.run([sys.executable, "-m", "dlm_jax.main", "compile", "--config=configs/shakespeare_mdlm.py",
                           "--mesh=data=2,fsdp=4", f"--config.data.path={corpus}", *TINY], cwd=ROOT, env=_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert result["per_device_mib"] > 0 and "MiB per device" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "dlm_jax.main", "compile", "--config=configs/shakespeare_mdlm.py",
                          "--mesh=fsdp=8", f"--config.data.path={corpus}", *TINY, "--config.model.d_model=36"],
                         cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model.d_model=36 is not divisible by mesh.fsdp=8" in bad.stderr


@pytest.mark.parametrize("before,after", [
    (None, "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),
])
def test_a_process_relaunches_itself_with_host_memory_on_huge_pages(before, after):
    """relaunch_with_huge_pages (the `dlm-jax` command calls it first) re-executes the same command line once with
    glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES; a setting of the user's own is kept (=0: opt out)."""
    code = ("import os; from dlm_jax.train.distributed import relaunch_with_huge_pages; "
            "print('start', flush=True); relaunch_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | ({} if before is None else
                                                                               {"GLIBC_TUNABLES": before})
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    relaunched = before is None or "hugetlb" not in before
    assert out.stdout.split() == ["start"] * (2 if relaunched else 1) + [after]
