"""launch/*.sh: syntax, --help, one-line errors, and --dry-run output (no network, no cloud, no Slurm).

The dry-run lines are parsed back with shlex (they are shell commands) and, where it is cheap, executed against
fake `ssh` / `scontrol` / `srun` / `sbatch` executables, so quoting and the per-process environment are checked
for real. local.sh also runs for real with trivial commands.
"""

import os
import shlex
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["tpu_pod.sh", "gpu_slurm.sh", "gpu_ssh.sh", "local.sh"]
GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")  # the GPU check (benchmarks/, run on a GPU host)
TRAIN = ["dlm-jax", "train", "--config=configs/mdlm_owt.py", "--workdir=gs://bucket/mdlm_owt"]


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment without the JAX settings conftest adds (they would leak into local.sh)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str] | None = None, cwd: str | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                          env=_env() if env is None else env, cwd=cwd, timeout=timeout)


def _dry(script: str, *args: str, **kwargs) -> list[str]:
    proc = _run(script, "--dry-run", *args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout.splitlines()


def _fake_bin(tmp_path, **scripts: str) -> dict[str, str]:
    """Executables named after the keys, on the front of PATH; returns the environment to run with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


# A fake ssh: skips its options and the destination, runs the remote command with sh here.
FAKE_SSH = 'while [[ $1 == -* ]]; do [[ $1 == -o ]] && shift; shift; done\nshift\nexec sh -c "$*"\n'


# ----------------------------------------------------------------------------------------------- all scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    proc = subprocess.run(["shellcheck", "-x", *[os.path.join(LAUNCH, s) for s in SCRIPTS], GPU_CHECK], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [[], ["out", "--bogus"], ["out", "--data"]])
def test_gpu_check_usage(args, tmp_path):
    """Without a results folder or with an unknown flag the GPU check says how to call it and does nothing."""
    proc = subprocess.run(["bash", GPU_CHECK, *args], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: benchmarks/gpu_check.sh RESULTS_DIR" in proc.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_executable_with_bash_shebang(script):
    path = os.path.join(LAUNCH, script)
    assert os.access(path, os.X_OK)
    with open(path, encoding="utf-8") as f:
        head = f.read(200)
    assert head.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in head


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(script, flag):
    proc = _run(script, flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: {script}")
    assert "--dry-run" in proc.stdout


@pytest.mark.parametrize(
    ("script", "args", "needle"),
    [
        ("tpu_pod.sh", ["run", "--zone=us-central2-b", "--", "true"], "--name is required"),
        ("tpu_pod.sh", ["run", "--name=dlm", "--", "true"], "--zone is required"),
        ("tpu_pod.sh", ["--name=dlm", "--zone=z"], "a subcommand is required"),
        ("tpu_pod.sh", ["launch", "--name=dlm", "--zone=z"], "unknown subcommand"),
        ("tpu_pod.sh", ["run", "--name=dlm", "--zone=z"], "run needs the command"),
        ("tpu_pod.sh", ["create", "--name=dlm", "--zone=z"], "create needs --accelerator"),
        ("tpu_pod.sh", ["create", "--name=dlm", "--zone=z", "--accelerator=x9-8"], "no default --version"),
        ("tpu_pod.sh", ["logs", "--name=Bad_Name", "--zone=z"], "--name must be"),
        ("gpu_slurm.sh", ["--", "true"], "--nodes is required"),
        ("gpu_slurm.sh", ["--nodes=0", "--", "true"], "--nodes must be a positive integer"),
        ("gpu_slurm.sh", ["--nodes=2"], "the command to run is missing"),
        ("gpu_ssh.sh", ["--", "true"], "--hosts is required"),
        ("gpu_ssh.sh", ["--hosts=a,,b", "--", "true"], "comma-separated list"),
        ("gpu_ssh.sh", ["--hosts=a,b"], "the command to run is missing"),
        ("local.sh", ["--", "true"], "--num_processes is required"),
        ("local.sh", ["--num_processes=two", "--", "true"], "--num_processes must be a positive integer"),
        ("local.sh", ["--num_processes=2", "--port=70000", "--", "true"], "--port must be a port number"),
        ("local.sh", ["--num_processes=2"], "the command to run is missing"),
        ("local.sh", ["--num_processes=2", "--bogus=1", "--", "true"], "unknown option --bogus"),
        ("local.sh", ["--num_processes"], "--num_processes needs a value"),
    ],
)
def test_bad_usage_is_one_line_error(script, args, needle):
    proc = _run(script, "--dry-run", *args)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{script}: error: ") and needle in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------- local.sh


def test_local_dry_run_prints_one_command_per_process():
    cmd = ["dlm-jax", "train", "--config=configs/quickstart.py", "--workdir=work dir/it's"]
    lines = _dry("local.sh", "--num_processes=2", "--port=23456", "--", *cmd)
    assert len(lines) == 2
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[0] == "env"
        env = dict(a.split("=", 1) for a in argv[1:-len(cmd)])
        assert env == {"DLM_COORDINATOR_ADDRESS": "localhost:23456", "DLM_NUM_PROCESSES": "2",
                       "DLM_PROCESS_ID": str(i), "DLM_CPU_COLLECTIVES": "gloo", "JAX_PLATFORMS": "cpu",
                       "PYTHONUNBUFFERED": "1"}
        assert argv[-len(cmd):] == cmd  # the user's words survive quoting exactly


def test_local_dry_run_devices_per_process_and_existing_env():
    lines = _dry("local.sh", "--num_processes=3", "--devices_per_process=4", "--", "python", "x.py",
                 env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d", JAX_PLATFORMS="cpu,tpu"))
    assert len(lines) == 3
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert f"DLM_PROCESS_ID={i}" in argv and "DLM_NUM_PROCESSES=3" in argv
        assert "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4" in argv
        assert "JAX_PLATFORMS=cpu,tpu" in argv
        assert argv[-2:] == ["python", "x.py"]


def test_local_runs_processes_with_prefixes(tmp_path):
    script = 'echo "id=$DLM_PROCESS_ID n=$DLM_NUM_PROCESSES addr=$DLM_COORDINATOR_ADDRESS c=$DLM_CPU_COLLECTIVES"'
    proc = _run("local.sh", "--num_processes=3", "--port=23457", "--", "bash", "-c", script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert lines == [f"[p{i}] id={i} n=3 addr=localhost:23457 c=gloo" for i in range(3)]


def test_local_failure_stops_the_others_and_propagates_status(tmp_path):
    script = 'if [ "$DLM_PROCESS_ID" = 1 ]; then echo boom; exit 3; fi; exec sleep 60'
    start = time.monotonic()
    proc = _run("local.sh", "--num_processes=3", "--", "bash", "-c", script, cwd=tmp_path, timeout=30)
    assert proc.returncode == 3
    assert time.monotonic() - start < 20  # the sleeping processes were killed, not waited for
    assert "[p1] boom" in proc.stdout
    assert "process 1 exited with status 3" in proc.stderr


# ----------------------------------------------------------------------------------------------- tpu_pod.sh


def _gcloud_command_arg(line: str) -> str:
    (arg,) = [a for a in shlex.split(line) if a.startswith("--command=")]
    return arg[len("--command="):]


def test_tpu_pod_run_dry_run(tmp_path):
    lines = _dry("tpu_pod.sh", "run", "--name=dlm", "--zone=us-central2-b", "--project=proj", "--", *TRAIN)
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dlm"]
    assert "--worker=all" in argv and "--zone=us-central2-b" in argv and "--project=proj" in argv
    remote = _gcloud_command_arg(lines[0])
    assert "nohup " + shlex.join(TRAIN) in remote
    assert "DLM_DISTRIBUTED=1" in remote and "dlm-jax.log" in remote


def test_tpu_pod_run_remote_command_really_runs_in_background(tmp_path):
    """The --command string, run by sh in a fake home: the words arrive intact, output goes to the log."""
    words = ["printf", "%s|", "a b", "it's", "$HOME", "--x=\"q\""]
    line = _dry("tpu_pod.sh", "run", "--name=dlm", "--zone=z", "--", *words)[0]
    home = tmp_path / "home"
    (home / "dlm-jax").mkdir(parents=True)
    proc = subprocess.run(["sh", "-c", _gcloud_command_arg(line)], env=_env(HOME=str(home)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    log = home / "dlm-jax.log"
    for _ in range(100):
        if log.exists() and log.read_text():
            break
        time.sleep(0.05)
    assert log.read_text() == "a b|it's|$HOME|--x=\"q\"|"
    assert (home / "dlm-jax.pid").read_text().strip().isdigit()


@pytest.mark.parametrize(
    ("accelerator", "version"),
    [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-64", "v2-alpha-tpuv5"),
     ("v6e-16", "v2-alpha-tpuv6e")],
)
def test_tpu_pod_create_dry_run(accelerator, version):
    lines = _dry("tpu_pod.sh", "create", "--name=dlm", "--zone=us-central2-b", f"--accelerator={accelerator}",
                 "--", "--spot")
    assert lines == [f"gcloud compute tpus tpu-vm create dlm --zone=us-central2-b --accelerator-type={accelerator} "
                     f"--version={version} --spot"]
    lines = _dry("tpu_pod.sh", "create", "--name=dlm", "--zone=z", f"--accelerator={accelerator}", "--version=rt")
    assert lines[0].endswith("--version=rt")


def test_tpu_pod_setup_dry_run():
    lines = _dry("tpu_pod.sh", "setup", "--name=dlm", "--zone=us-central2-b", "--extras=tpu,hf")
    scp = [line for line in lines if " scp " in line]
    assert len(scp) == 1
    argv = shlex.split(scp[0])
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--recurse" in argv and "--worker=all" in argv and "dlm:." in argv
    (install,) = [line for line in lines if "pip install" in line]
    assert "--worker=all" in shlex.split(install)
    remote = _gcloud_command_arg(install)
    assert "pip install -q -e '.[tpu,hf]'" in remote
    assert subprocess.run(["sh", "-n", "-c", remote]).returncode == 0
    # The staging commands copy this repository without its virtualenv / git directory.
    (tar,) = [line for line in lines if "tar -C" in line]
    assert "--exclude=./.venv" in tar and "--exclude=./.git" in tar
    # Without --extras a pod gets the TPU jax and the gs:// file system.
    lines = _dry("tpu_pod.sh", "setup", "--name=dlm", "--zone=us-central2-b")
    (install,) = [line for line in lines if "pip install" in line]
    assert "pip install -q -e '.[tpu,gcs]'" in _gcloud_command_arg(install)


@pytest.mark.parametrize(
    ("subcommand", "expected"),
    [("logs", "--worker=0"), ("stop", "--worker=all"), ("delete", "--quiet")],
)
def test_tpu_pod_other_subcommands_dry_run(subcommand, expected):
    lines = _dry("tpu_pod.sh", subcommand, "--name=dlm", "--zone=us-central2-b")
    assert len(lines) == 1
    assert lines[0].startswith("gcloud compute tpus tpu-vm ") and " dlm " in lines[0] and expected in lines[0]


# ----------------------------------------------------------------------------------------------- gpu_slurm.sh


def test_gpu_slurm_dry_run_prints_script_and_sbatch():
    lines = _dry("gpu_slurm.sh", "--nodes=2", "--gpus_per_node=8", "--partition=gpu", "--time=1:00:00",
                 "--sbatch_arg=--exclusive", "--", *TRAIN)
    text = "\n".join(lines)
    assert lines[0] == "cat > ./dlm-jax.sbatch <<'DLM_JAX_SBATCH_EOF'"
    assert lines[1] == "#!/bin/bash"
    assert lines[-2] == "DLM_JAX_SBATCH_EOF" and lines[-1] == "sbatch ./dlm-jax.sbatch"
    for needle in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                   "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --exclusive",
                   'scontrol show hostnames "$SLURM_JOB_NODELIST"', "DLM_COORDINATOR_ADDRESS=",
                   'DLM_NUM_PROCESSES="$SLURM_NNODES"', 'DLM_PROCESS_ID="$SLURM_PROCID"', "srun ",
                   shlex.join(TRAIN)]:
        assert needle in text, needle


def test_gpu_slurm_generated_script_runs_one_task_per_node(tmp_path):
    """Executes the dry-run output with fake sbatch / scontrol / srun: each task sees its own process id."""
    env = _fake_bin(
        tmp_path,
        sbatch='SLURM_JOB_NODELIST="n[1-3]" SLURM_NNODES=3 SLURM_JOB_ID=4242 exec bash "$1"\n',
        scontrol='printf "n1\\nn2\\nn3\\n"\n',
        srun='while [[ $1 == --* ]]; do shift; done\n'
             'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i "$@" || exit; done\n',
    )
    probe = ["sh", "-c", 'echo "id=$DLM_PROCESS_ID n=$DLM_NUM_PROCESSES addr=$DLM_COORDINATOR_ADDRESS $0"', "it's"]
    script = tmp_path / "job.sbatch"
    lines = _dry("gpu_slurm.sh", "--nodes=3", f"--script_file={script}", "--", *probe)
    proc = subprocess.run(["bash", "-c", "\n".join(lines)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert script.exists()
    out = proc.stdout.splitlines()
    assert out[0] == "coordinator n1:24242, 3 processes on: n1 n2 n3"  # port 20000 + 4242 % 20000
    assert out[1:] == [f"id={i} n=3 addr=n1:24242 it's" for i in range(3)]


def test_gpu_slurm_fixed_port_and_cpus():
    text = "\n".join(_dry("gpu_slurm.sh", "--nodes=4", "--port=23456", "--cpus_per_task=12", "--", "true"))
    assert "port=23456" in text and "#SBATCH --cpus-per-task=12" in text and "--cpus-per-task=12 \\" in text


# ----------------------------------------------------------------------------------------------- gpu_ssh.sh


def test_gpu_ssh_dry_run_one_ssh_per_host():
    hosts = ["alice@gpu-a", "gpu-b", "gpu-c"]
    lines = _dry("gpu_ssh.sh", f"--hosts={','.join(hosts)}", "--port=2222", "--remote_dir=/srv/dlm jax", "--",
                 *TRAIN)
    assert lines[0] == "mkdir -p logs/gpu_ssh"
    ssh_lines = lines[1:]
    assert len(ssh_lines) == len(hosts)
    for i, (host, line) in enumerate(zip(hosts, ssh_lines, strict=True)):
        argv = shlex.split(line)
        assert argv[:3] == ["ssh", "-o", "BatchMode=yes"] and argv[3] == host
        remote = argv[4]
        assert "cd '/srv/dlm jax'" in remote
        assert f"DLM_PROCESS_ID={i} " in remote
        assert "DLM_COORDINATOR_ADDRESS=gpu-a:2222" in remote and "DLM_NUM_PROCESSES=3" in remote
        assert shlex.join(TRAIN) in remote
        assert line.endswith(f"> logs/gpu_ssh/p{i}-{host}.log 2>&1 < /dev/null &")


def test_gpu_ssh_coordinator_override():
    lines = _dry("gpu_ssh.sh", "--hosts=a,b", "--coordinator=10.0.0.1", "--venv=none", "--", "true")
    assert all("DLM_COORDINATOR_ADDRESS=10.0.0.1:12345" in line for line in lines[1:])
    assert not any("activate" in line for line in lines)


def test_gpu_ssh_runs_through_fake_ssh(tmp_path):
    env = _fake_bin(tmp_path, ssh=FAKE_SSH)
    probe = 'echo "id=$DLM_PROCESS_ID n=$DLM_NUM_PROCESSES addr=$DLM_COORDINATOR_ADDRESS"'
    proc = _run("gpu_ssh.sh", "--hosts=h1,u@h2", f"--remote_dir={tmp_path}", "--port=2345", "--", "sh", "-c",
                probe, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    logs = tmp_path / "logs" / "gpu_ssh"
    assert (logs / "p0-h1.log").read_text() == "id=0 n=2 addr=h1:2345\n"
    assert (logs / "p1-u@h2.log").read_text() == "id=1 n=2 addr=h1:2345\n"
    assert not any(os.path.exists(f"/tmp/dlm-jax-2345-p{i}.pid") for i in range(2))  # removed on exit


def test_gpu_ssh_failure_propagates_status(tmp_path):
    env = _fake_bin(tmp_path, ssh=FAKE_SSH)
    probe = 'if [ "$DLM_PROCESS_ID" = 0 ]; then exit 5; fi; exec sleep 60'
    start = time.monotonic()
    proc = _run("gpu_ssh.sh", "--hosts=h1,h2", f"--remote_dir={tmp_path}", "--port=2346", "--", "sh", "-c", probe,
                env=env, cwd=tmp_path, timeout=40)
    assert proc.returncode == 5
    assert time.monotonic() - start < 30
    assert "process 0 on h1 exited with status 5" in proc.stderr
    assert not os.path.exists("/tmp/dlm-jax-2346-p1.pid")  # the remote sleep was stopped via its pid file
