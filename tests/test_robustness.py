"""Hostile input and ordinary OS failures end in one `error:` line, exit 2, no traceback, nothing lost (issue 18):
the CLI boundary (errors.one_line), numbers refused anywhere they are read, paths that cannot be written, a corpus
too big to hold in memory, a missing optional extra, an out-of-memory sample call, prepare's staging directory."""

import errno
import os
import subprocess
import sys

import pytest

from dlm_jax import errors
from tests.helpers import ROOT
from tests.test_cli import TINY, _assert_one_line_error, run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus):
    """A tiny MDLM trained 2 steps through the CLI."""
    path = str(tmp_path_factory.mktemp("runs") / "mdlm")
    run("train", "--config=configs/shakespeare_mdlm.py", f"--workdir={path}", f"--config.data.path={corpus}",
        "--config.train.num_steps=2", "--config.train.eval_every=0", *TINY)
    return path


def _train(corpus, workdir, *extra, check=False):
    return run("train", "--config=configs/shakespeare_mdlm.py", f"--workdir={workdir}", f"--config.data.path={corpus}",
               "--config.train.num_steps=2", "--config.train.eval_every=0", *TINY, *extra, check=check)


@pytest.mark.parametrize(
    "exc,message",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/w/c/4"), "No space left on device: /w/c/4; free disk"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/w"), "Read-only file system: /ro/w; the storage is read"),
        (ValueError("RESOURCE_EXHAUSTED: write failed [os_error_code='28']"), "No space left on device; free disk"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/w"), "a part of this path is a regular file"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "Permission denied: /root/x; no permission"),
        (ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers"), "pip install -e '.[hf]'"),
        (ModuleNotFoundError("No module named 'gcsfs.core'", name="gcsfs.core"), "pip install -e '.[gcs]'"),
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 17 bytes."), "lower --batch_size"),
        (MemoryError(), "out of memory (MemoryError)"),
        (ValueError("something odd\nsecond line"), "ValueError: something odd second line (unexpected: rerun with "
                                                   "DLM_JAX_DEBUG=1"),
    ],
)
def test_one_line_names_what_and_how_to_fix(exc, message):
    text = errors.one_line(exc)
    assert message in text and "\n" not in text, text


def test_the_cli_boundary_turns_any_exception_into_one_line(monkeypatch, capsys):
    from dlm_jax import main as cli

    def fails(args, config):
        raise OSError(errno.EROFS, "Read-only file system", "/ro/out")

    monkeypatch.setitem(cli.COMMANDS, "prepare", fails)
    monkeypatch.delenv("DLM_JAX_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "--config=configs/quickstart.py", "--output_dir=/ro/out"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: Read-only file system: /ro/out; the storage is read-only; use a writable --workdir / --output"]
    with pytest.raises(OSError):  # developers get the traceback
        cli.main(["prepare", "--config=configs/quickstart.py", "--output_dir=/ro/out", "--debug"])


def test_a_recipe_whose_get_config_raises_is_one_line_and_debug_shows_the_traceback(tmp_path):
    recipe = tmp_path / "broken.py"
    recipe.write_text("def get_config():\n    raise KeyError('no_such_key')\n")
    args = ["train", f"--config={recipe}", f"--workdir={tmp_path / 'w'}"]
    _assert_one_line_error(run(*args, check=False), "get_config() raised KeyError: 'no_such_key'")
    proc = subprocess.run([sys.executable, "-m", "dlm_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DLM_JAX_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "KeyError" in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--config.train.learning_rate=-0.001"], "'train.learning_rate' must be >= 0, got -0.001"),
        (["--config.train.learning_rate=0"], "'train.learning_rate' must be > 0"),
        (["--config.train.learning_rate=1e999"], "'train.learning_rate' must be a finite number, got inf"),
        (["--config.mdlm.t_eps=-1e-3"], "'mdlm.t_eps' must be >= 0"),
        (["--config.train.warmup_steps=-5"], "'train.warmup_steps' must be >= 0"),
        (["--config.model.dropout=1.5"], "'model.dropout' must be in [0, 1)"),
        (["--config.train.b2=1.0"], "'train.b2' must be in [0, 1)"),
        (["--config.eval.num_batches=0"], "'eval.num_batches' must be >= 1 (or -1"),
    ],
)
def test_numbers_out_of_range_are_refused_before_anything_is_written(tmp_path, corpus, extra, message):
    _assert_one_line_error(_train(corpus, tmp_path / "w", *extra), message)
    assert not (tmp_path / "w").exists()


def test_a_non_finite_number_in_a_recipe_file_is_refused(tmp_path, corpus):
    recipe = tmp_path / "nan_recipe.py"
    base = os.path.join(ROOT, "configs", "shakespeare_mdlm.py")
    recipe.write_text(f"import importlib.util\nspec = importlib.util.spec_from_file_location('base', {base!r})\n"
                      "base = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(base)\n\n\n"
                      "def get_config():\n    c = base.get_config()\n    c.train.grad_clip = float('nan')\n"
                      "    return c\n")
    proc = run("train", f"--config={recipe}", f"--workdir={tmp_path / 'w'}", f"--config.data.path={corpus}", *TINY,
               check=False)
    _assert_one_line_error(proc, "'train.grad_clip' must be a finite number, got nan")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--temperature=nan"], "argument --temperature: 'nan' is not a finite number"),
        (["--top_p=inf"], "argument --top_p: 'inf' is not a finite number"),
        (["--sampler=semi_ar", "--sampler.inner=threshold", "--sampler.min_confidence=1e999"],
         "--sampler.min_confidence must be a finite"),
        (["--sampler=semi_ar", "--sampler.block_length=-4"], "--sampler.block_length must be >= 0, got -4"),
        (["--num_samples"], "argument --num_samples: expected one argument"),
    ],
)
def test_bad_sampling_numbers_are_one_line(workdir, extra, message):
    _assert_one_line_error(run("sample", f"--workdir={workdir}", "--steps=2", *extra, check=False), message)


def test_an_out_of_memory_sample_call_says_lower_the_batch_size(workdir):
    proc = run("sample", f"--workdir={workdir}", "--num_samples=10000000", "--steps=2", check=False)
    _assert_one_line_error(proc, "out of memory")
    assert "--batch_size" in proc.stderr


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_workdir_that_is_or_lies_under_a_regular_file_is_one_line(tmp_path, corpus, where):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me\n")
    workdir = blocker if where == "file" else blocker / "run"
    _assert_one_line_error(_train(corpus, workdir), str(blocker))
    assert blocker.read_text() == "keep me\n"


def test_a_corpus_too_big_for_memory_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: 3 MB of size, no disk used, nothing worth reading
        f.truncate(3 << 20)
    proc = _train(str(big), tmp_path / "w", "--config.data.max_text_mb=2")
    _assert_one_line_error(proc, "holds 3 MB of text, over data.max_text_mb=2")
    assert "--config.data.streaming=True" in proc.stderr and not (tmp_path / "w").exists()


def test_a_missing_optional_extra_names_it(tmp_path):
    code = ("import sys; sys.modules['tokenizers'] = None\nfrom dlm_jax.main import main\n"
            "main(['compile', '--config=configs/mdlm_owt.py', '--mesh=data=2,fsdp=4'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    _assert_one_line_error(proc, "the optional module 'tokenizers' is not installed; pip install -e '.[hf]'")


@pytest.mark.parametrize("where", ["file", "under_file", "too_short"])
def test_prepare_refuses_bad_output_and_leaves_no_staging_directory(tmp_path, corpus, where):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me\n")
    output = {"file": blocker, "under_file": blocker / "out", "too_short": tmp_path / "out"}[where]
    extra = ["--config.data.seq_len=4096"] if where == "too_short" else []
    proc = run("prepare", "--config=configs/shakespeare_mdlm.py", f"--output_dir={output}",
               f"--config.data.path={corpus}", *extra, check=False)
    _assert_one_line_error(proc, {"file": "is an existing file", "under_file": "lies under the regular file",
                                  "too_short": "shorter than one sequence"}[where])
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"] and blocker.read_text() == "keep me\n"
