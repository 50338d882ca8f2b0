"""`dlm-jax sample` / `eval` as a user meets them: rows written batch by batch with their settings, output paths
checked before anything runs, files of other settings never replaced, --checkpoint_step, --help and --version."""

import importlib.metadata
import json
import os

import numpy as np
import pytest

from dlm_jax import main
from dlm_jax.errors import UserError
from dlm_jax.eval import sample_output
from tests.helpers import small_corpus
from tests.test_cli import TINY, _assert_one_line_error, last_json, run

SAMPLE = ["--num_samples=3", "--batch_size=2", "--steps=4", "--length=16", "--prompt=To be"]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """A tiny MDLM with checkpoints at steps 2 and 4, and a tiny AR (2 steps), trained through the CLI."""
    root = tmp_path_factory.mktemp("ux")
    corpus = small_corpus(root)
    out = {}
    for family, steps in (("mdlm", 4), ("ar", 2)):
        out[family] = str(root / family)
        run("train", f"--config=configs/shakespeare_{family}.py", f"--workdir={out[family]}",
            f"--config.data.path={corpus}", *TINY, f"--config.train.num_steps={steps}", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=2")
    return out


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_rows_carry_their_settings_and_arrive_batch_by_batch(workdirs, tmp_path):
    output = tmp_path / "s.jsonl"
    proc = run("sample", f"--workdir={workdirs['mdlm']}", *SAMPLE, "--sampler=semi_ar", "--sampler.block_length=8",
               f"--output={output}")
    stats, rows = last_json(proc.stdout), _rows(output)
    assert stats["checkpoint_step"] == 4 and stats["output"] == str(output) and stats["steps"] == 4
    assert proc.stdout.count("--- sample") == 3 and len(rows) == 3
    assert list(rows[0]) == [*sample_output.SETTINGS, "index", "text", "tokens"]
    assert rows[0]["options"]["block_length"] == 8 and rows[0]["options"]["inner"] == "ancestral"  # all, as a dict
    want = {"prompt": "To be", "infill": None, "sampler": "semi_ar", "seed": 0, "steps": 4, "length": 16,
            "temperature": 1.0, "top_p": 1.0, "checkpoint_step": 4}
    assert all({k: r[k] for k in want} == want for r in rows) and [r["index"] for r in rows] == [0, 1, 2]
    assert all(r["text"].startswith("To be") and len(r["tokens"]) == 16 for r in rows)
    progress = [line for line in proc.stderr.splitlines() if line.startswith("batch ")]
    assert [p.split(" (")[0] for p in progress] == ["batch 1/2 done", "batch 2/2 done"]
    assert "(2 samples, " in progress[0] and "(3 samples, " in progress[1] and progress[1].endswith(" tok/s)")


def test_the_writer_replaces_the_file_with_the_first_batch_then_appends_and_flushes(tmp_path):
    class Bytes:
        def decode(self, ids):
            return bytes(int(i) for i in ids).decode()

    output = tmp_path / "new" / "s.jsonl"
    writer = sample_output.SampleWriter(str(output), {"sampler": "x", "checkpoint_step": 7}, Bytes(), 2)
    writer(0, 2, np.array([[104, 105], [111, 107]]), 0.5)
    assert [r["text"] for r in _rows(output)] == ["hi", "ok"]  # on disk before the next batch is drawn
    writer(1, 2, np.array([[121, 111]]), 1.0)
    assert [(r["index"], r["text"], r["checkpoint_step"]) for r in _rows(output)] == [(0, "hi", 7), (1, "ok", 7),
                                                                                       (2, "yo", 7)]
    sample_output.SampleWriter(str(output), {"sampler": "x", "checkpoint_step": 7}, Bytes(), 2)(
        0, 1, np.array([[104, 105]]), 0.5)
    assert len(_rows(output)) == 1  # a rerun replaces the file


@pytest.mark.parametrize("case", ["directory", "under a file", "deep under a file"])
def test_an_unusable_output_path_is_one_line_before_anything_runs(workdirs, tmp_path, case):
    blocker = tmp_path / "file"
    blocker.write_text("mine\n")
    output = {"directory": tmp_path, "under a file": blocker / "s.jsonl",
              "deep under a file": blocker / "a" / "s.jsonl"}[case]
    before = sorted(os.listdir(tmp_path))
    # --checkpoint_step=99 does not exist: the path error can only win by coming before the model is restored
    proc = run("sample", f"--workdir={workdirs['mdlm']}", *SAMPLE, "--checkpoint_step=99", f"--output={output}",
               check=False)
    message = "is a directory" if case == "directory" else "a regular file"
    _assert_one_line_error(proc, message)
    assert str(output) in proc.stderr and "--output" in proc.stderr
    assert "batch " not in proc.stderr and "--- sample" not in proc.stdout
    assert sorted(os.listdir(tmp_path)) == before and blocker.read_text() == "mine\n"


def test_an_output_this_process_may_not_write_is_refused(tmp_path, monkeypatch):
    """Read-only storage or no permission (root may write anywhere, so os.access answers as on such storage)."""
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="is not writable"):
        sample_output.check_output_path(str(tmp_path / "ro" / "s.jsonl"))
    assert os.listdir(tmp_path / "ro") == []


def test_a_file_of_other_settings_is_refused_and_a_rerun_replaces_it(workdirs, tmp_path):
    output = tmp_path / "s.jsonl"
    args = ["sample", f"--workdir={workdirs['mdlm']}", *SAMPLE, f"--output={output}"]
    run(*args)
    first = output.read_text()
    for extra, differs in ((["--seed=1"], "seed: 0 there, 1 now"), (["--top_p=0.9"], "top_p: 1.0 there, 0.9 now"),
                           (["--sampler=cached"], "sampler: 'ancestral' there, 'cached' now"),
                           (["--checkpoint_step=2"], "checkpoint_step: 4 there, 2 now")):
        proc = run(*args, *extra, check=False)
        _assert_one_line_error(proc, f"{output} holds samples made with other settings ({differs})")
        assert "new --output" in proc.stderr and "delete the file" in proc.stderr and "batch " not in proc.stderr
        assert output.read_text() == first
    run(*args, "--num_samples=1")  # same settings, fewer samples: a rerun replaces the file
    assert len(_rows(output)) == 1


def test_the_default_path_moves_on_instead_of_overwriting_other_settings(tmp_path):
    settings = {"sampler": "ancestral", "seed": 0, "checkpoint_step": 4}
    base = tmp_path / "ancestral_T4_seed0.jsonl"
    assert sample_output.free_default_path(str(base), settings) == str(base)  # missing: itself
    base.write_text(json.dumps({**settings, "text": "a"}) + "\n")
    assert sample_output.free_default_path(str(base), settings) == str(base)  # same settings: replaced
    (tmp_path / "ancestral_T4_seed0-1.jsonl").write_text(json.dumps({**settings, "seed": 9}) + "\n")
    other = {**settings, "seed": 1}
    assert sample_output.free_default_path(str(base), other) == str(tmp_path / "ancestral_T4_seed0-2.jsonl")


def test_an_unreadable_existing_file_counts_as_other_settings(tmp_path):
    settings = {"prompt": None, "sampler": "ar", "seed": 0}
    path = tmp_path / "s.jsonl"
    sample_output.check_existing(str(path), settings)  # missing: fine
    path.write_text("")
    sample_output.check_existing(str(path), settings)  # empty: nothing to lose
    for text in ("not json\n", "[1, 2]\n", b"\xff\xfe\x00garbage"):
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(UserError, match="its first line is not a JSON row of `dlm-jax sample`"):
            sample_output.check_existing(str(path), settings)
    path.write_text(json.dumps({"text": "old rows had no settings"}) + "\n")
    with pytest.raises(UserError, match=r"\(prompt: '\(not recorded\)' there, None now\)"):
        sample_output.check_existing(str(path), settings)
    path.write_text(json.dumps({**settings, "text": "a", "tokens": [1]}) + "\n")
    sample_output.check_existing(str(path), settings)


def test_checkpoint_step_picks_the_checkpoint_for_sample_and_eval(workdirs, tmp_path):
    output = tmp_path / "s.jsonl"
    stats = last_json(run("sample", f"--workdir={workdirs['mdlm']}", *SAMPLE, "--checkpoint_step=2",
                          f"--output={output}").stdout)
    assert stats["checkpoint_step"] == 2 and all(r["checkpoint_step"] == 2 for r in _rows(output))
    assert last_json(run("eval", f"--workdir={workdirs['mdlm']}", "--checkpoint_step=2").stdout)["step"] == 2
    for command in (["sample", *SAMPLE, f"--output={tmp_path / 'x.jsonl'}"], ["eval"]):
        proc = run(command[0], f"--workdir={workdirs['mdlm']}", *command[1:], "--checkpoint_step=3", check=False)
        _assert_one_line_error(proc, "--checkpoint_step=3: no checkpoint of step 3 in ")
        assert "its steps: 2, 4" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_help_lists_every_sampler_and_config_overrides_and_version_prints_it():
    for command in ("sample", "eval"):
        out = run(command, "--help").stdout
        assert "prefix_cache" in out and "dual_cache" in out and "ar_nocache" in out and "--config.KEY=VALUE" in out
        assert "--sampler=NAME --help" in out and "--checkpoint_step" in out
    assert "--config.KEY=VALUE" in run("train", "--help").stdout
    assert run("--version").stdout.strip() == f"dlm-jax {importlib.metadata.version('dlm-jax')}"


def test_version_falls_back_to_setup_py(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    setup = open(os.path.join(os.path.dirname(os.path.dirname(main.__file__)), "setup.py")).read()
    assert f'version="{main.version()}"' in setup


def test_ar_rows_have_no_diffusion_steps_and_ar_eval_reports_nll(workdirs, tmp_path):
    output = tmp_path / "ar.jsonl"
    stats = last_json(run("sample", f"--workdir={workdirs['ar']}", *SAMPLE, f"--output={output}").stdout)
    assert stats["sampler"] == "ar" and stats["steps"] is None and stats["checkpoint_step"] == 2
    rows = _rows(output)
    assert len(rows) == 3 and all("steps" not in r and r["sampler"] == "ar" for r in rows)
    assert list(rows[0]) == [k for k in sample_output.SETTINGS if k != "steps"] + ["index", "text", "tokens"]
    result = last_json(run("eval", f"--workdir={workdirs['ar']}").stdout)
    assert result["metric"] == "nll" and result["nll"] > 0 and "nelbo" not in result
