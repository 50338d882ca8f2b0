"""The `dlm-jax` CLI as a user runs it: train -> eval -> sample, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, small_corpus

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


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, corpus):
    """A tiny MDLM and a tiny AR, trained through the CLI (4 steps, eval at step 4)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for family in ("mdlm", "ar"):
        workdir = str(root / family)
        proc = run("train", f"--config=configs/shakespeare_{family}.py", f"--workdir={workdir}",
                   f"--config.data.path={corpus}", "--config.train.num_steps=4", "--config.train.eval_every=4", *TINY)
        assert last_json(proc.stdout)["workdir"] == workdir
        out[family] = workdir
    return out


@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_train_eval_sample_end_to_end(workdirs, family):
    workdir = workdirs[family]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {"step", "loss", "learning_rate", "tokens_per_second"} <= set(records[0])
    assert any("val_bpc" in r for r in records)
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    metric = "nll" if family == "ar" else "nelbo"  # AR's is exact, the diffusion NELBO a bound
    assert any(f"val_{metric}" in r for r in records)
    result = last_json(run("eval", f"--workdir={workdir}").stdout)
    assert {"step", "metric", metric, "ppl", "bits_per_token", "num_tokens", "bpc"} <= set(result)
    assert result["step"] == 4 and result["num_tokens"] == 2 * 8 * 32 and 0 < result[metric] < 10
    assert result["metric"] == metric and ("nelbo" in result) == (family != "ar")

    output = os.path.join(workdir, "s.jsonl")
    args = ["sample", f"--workdir={workdir}", "--num_samples=3", "--batch_size=2", "--steps=8", "--length=16",
            "--prompt=To be", f"--judge_workdir={workdirs['ar']}", f"--output={output}"]
    out = run(*args)
    stats = last_json(out.stdout)
    keys = {"sampler", "steps", "nfe", "num_samples", "length", "seconds", "tokens_per_second", "entropy_bits",
            "gen_ppl"}
    assert keys <= set(stats)
    assert stats["num_samples"] == 3 and stats["length"] == 16 and stats["gen_ppl"] > 1
    assert stats["sampler"] == ("ancestral" if family == "mdlm" else "ar")
    assert 1 <= stats["nfe"] <= (8 if family == "mdlm" else 16 - 5)
    samples = [json.loads(line) for line in open(output)]
    assert len(samples) == 3 and all(s["text"].startswith("To be") and len(s["tokens"]) == 16 for s in samples)
    assert out.stdout.count("--- sample") == 3
    run(*args[:-1], f"--output={output}.2")
    again = [json.loads(line) for line in open(f"{output}.2")]
    assert again == samples  # same seed, same samples


def test_generation_sweep_writes_table_and_plot(workdirs, tmp_path):
    out = run("eval", f"--workdir={workdirs['mdlm']}", "--gen", "--samplers=ancestral,cached", "--steps_list=4,8",
              "--num_samples=2", "--length=16", f"--judge_workdir={workdirs['ar']}", f"--output_dir={tmp_path}")
    rows = last_json(out.stdout)["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ancestral", 4), ("ancestral", 8), ("cached", 4),
                                                            ("cached", 8)]
    assert all(r["gen_ppl"] > 1 for r in rows)
    assert {"gen_sweep.json", "gen_sweep.csv", "gen_sweep.png"} <= set(os.listdir(tmp_path))


def test_ccdd_recipe_end_to_end_with_the_ar_as_encoder(workdirs, corpus, tmp_path):
    """configs/shakespeare_ccdd.py as its docstring runs it: train on a trained AR's latents, eval (the valid bound as
    nelbo, the paper's token term labelled beside it), guided sampling and the sweep against the AR judge."""
    workdir = str(tmp_path / "ccdd")
    run("train", "--config=configs/shakespeare_ccdd.py", f"--workdir={workdir}", f"--config.data.path={corpus}",
        f"--config.components.encoder.workdir={workdirs['ar']}", "--config.train.num_steps=2",
        "--config.train.eval_every=2", "--config.ccdd.fusion=two_stream", *TINY)
    result = last_json(run("eval", f"--workdir={workdir}").stdout)
    assert result["metric"] == "nelbo"
    pieces = ("nelbo_tokens_given_latent", "bound_recon", "bound_latent", "bound_prior")
    assert all(np.isfinite(result[k]) for k in pieces) and "ppl_tokens_given_latent" in result
    np.testing.assert_allclose(result["nelbo"], sum(result[k] for k in pieces), rtol=0.02)  # one rng stream
    assert result["nelbo"] > result["nelbo_tokens_given_latent"]
    stats = last_json(run("sample", f"--workdir={workdir}", "--sampler=ccdd", "--sampler.guidance=1.5",
                          "--sampler.latent_step=ddpm", "--num_samples=2", "--steps=4", "--length=16",
                          "--prompt=To", f"--judge_workdir={workdirs['ar']}").stdout)
    assert stats["family"] == "ccdd" and stats["nfe"] in (6, 8) and stats["gen_ppl"] > 1  # guided: 2 per forward
    out = run("eval", f"--workdir={workdir}", "--gen", "--steps_list=4,8", "--num_samples=2", "--length=16",
              f"--judge_workdir={workdirs['ar']}", f"--output_dir={tmp_path}")
    assert [(r["sampler"], r["steps"]) for r in last_json(out.stdout)["rows"]] == [("ccdd", 4), ("ccdd", 8)]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sampler=nope"], "unknown sampler 'nope'"),
        (["--steps=0"], "--steps must be >= 1"),
        (["--length=4096"], "trained on data.seq_len=32"),
        (["--infill=ab[MASK*3]c", "--sampler=cached"], None),  # fine: infill on a diffusion model
        (["--sampler=semi_ar", "--sampler.blocks=4"], "sampler 'semi_ar' has no option 'blocks'; its options: "
                                                     "block_length=0, inner=ancestral, unmask_schedule=linear"),
        (["--sampler=semi_ar", "--sampler.block_length=four"], "'sampler.block_length' wants a int"),
        (["--sampler=semi_ar", "--sampler.inner=nope"], "choose one of ancestral, cached"),
        (["--sampler.inner=cached"], "--sampler.KEY options need --sampler=NAME"),
        (["--sampler=semi_ar", "--inner=cached"], "--inner is now a sampler option: --sampler.inner=..."),
        (["--sampler=semi_ar", "--sampler.block_length=4", "--sampler.inner=topk_confidence", "--length=16",
          "--steps=8"], None),
        (["--sampler=semi_ar", "--sampler.block_length=8", "--sampler.window=32", "--length=64", "--steps=8"],
         None),  # twice the training length through a sliding window
        (["--sampler=semi_ar", "--sampler.block_length=8", "--sampler.window=12", "--length=64", "--steps=8"],
         "--sampler.window=12 must be a multiple of the block (8)"),
    ],
)
def test_sample_bad_input_is_one_line(workdirs, tmp_path, extra, message):
    output = f"--output={tmp_path / 's.jsonl'}"  # the default path of the two semi_ar settings is the same file
    proc = run("sample", f"--workdir={workdirs['mdlm']}", "--num_samples=1", "--steps=4", output, *extra,
               check=message is None)
    if message is not None:
        _assert_one_line_error(proc, message)


def test_sampler_help_lists_its_options(workdirs):
    out = run("sample", f"--workdir={workdirs['mdlm']}", "--sampler=semi_ar", "--help").stdout
    assert "--sampler.block_length=0" in out and "--sampler.inner=ancestral" in out and "topk_confidence" in out
    out = run("sample", "--sampler=ar", "--help").stdout  # no workdir: the families that have it
    assert "ar (ar)" in out and "no options of its own" in out


def test_judge_with_another_tokenizer_is_refused_unless_retokenized(workdirs, corpus, tmp_path):
    judge = str(tmp_path / "char_ar")
    run("train", "--config=configs/shakespeare_ar.py", f"--workdir={judge}", f"--config.data.path={corpus}",
        "--config.data.tokenizer=char", "--config.train.num_steps=1", "--config.train.eval_every=0", *TINY)
    args = ["sample", f"--workdir={workdirs['mdlm']}", "--num_samples=1", "--steps=4", "--length=16",
            f"--judge_workdir={judge}"]
    _assert_one_line_error(run(*args, check=False), "--retokenize")
    proc = run(*args, "--retokenize")
    assert last_json(proc.stdout)["gen_ppl"] > 1 and "re-tokenizing" in proc.stderr


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


def test_judge_windows_score_every_token_once_with_half_a_context_before_it():
    from dlm_jax.eval.genppl import judge_windows

    assert judge_windows(20, 32) == [(0, 20, 0)]  # fits: one window, as before
    assert judge_windows(80, 32) == [(0, 32, 0), (16, 48, 32), (32, 64, 48), (48, 80, 64)]
    for length, context in ((80, 32), (33, 32), (100, 7), (64, 32)):
        scored = np.concatenate([np.arange(max(s, b), e) for b, e, s in judge_windows(length, context)])
        np.testing.assert_array_equal(scored, np.arange(length))  # each token once, in order
        assert all(e - b <= context and (s == 0 or s - b >= context // 2) for b, e, s in judge_windows(length, context))


def test_gen_ppl_of_rows_longer_than_the_judge_context(workdirs):
    """A row of 2.5 contexts is scored window by window: the pooled NLL is the sum over windows of the NLL of the
    tokens each window scores (computed here window by window), every token once."""
    from dlm_jax.eval.genppl import Judge

    judge = Judge(workdirs["ar"])
    context = judge.exp.config.data.seq_len
    row = np.random.default_rng(0).integers(0, 256, 5 * context // 2).astype(np.int32)
    got = judge.gen_ppl([row])
    assert got["gen_tokens"] == got["gen_tokens_no_eos"] == len(row) and got["judge_context"] == context
    want = 0.0
    for begin, end, scored in [(0, context, 0), (context // 2, 3 * context // 2, context),
                               (context, 2 * context, 3 * context // 2), (3 * context // 2, len(row), 2 * context)]:
        mask = (np.arange(begin, end) >= scored).astype(np.float32)[None]
        nll, count = judge._nll(judge.params, row[None, begin:end], np.stack([mask, mask]))
        assert int(count[0]) == end - scored
        want += float(nll[0])
    assert got["gen_nll"] == pytest.approx(want / len(row), rel=1e-5)
    assert judge.gen_ppl([row[:context]])["judge_windows"] == 1


def test_gen_ppl_rules_and_the_retokenized_path_score_the_same_span(workdirs):
    """gen_ppl: tokens up to and including the first EOS; gen_ppl_no_eos: every non-EOS token; and re-tokenizing
    (each stretch between EOS ids decoded and re-encoded, EOS kept) scores exactly the same tokens."""
    import numpy as np

    from dlm_jax.data.tokenizers import ByteTokenizer
    from dlm_jax.eval.genppl import Judge, span_mask, to_judge_ids

    judge = Judge(workdirs["ar"])
    eos = judge.tokenizer.eos_id
    text = ByteTokenizer()
    rows = [np.array([84, 111, eos, 98, 101, eos, 33], np.int32), np.array([72, 105, 33, 33], np.int32)]
    np.testing.assert_array_equal(span_mask(rows[0], eos), [1, 1, 1, 0, 0, 0, 0])
    retokenized = [to_judge_ids(r, text, judge.tokenizer) for r in rows]
    for a, b in zip(retokenized, rows, strict=True):
        np.testing.assert_array_equal(a, b)  # bytes -> bytes: the same ids, EOS kept where it was
    direct, again = judge.gen_ppl(rows), judge.gen_ppl(retokenized)
    assert direct == again
    assert direct["gen_tokens"] == 3 + 4 and direct["gen_tokens_no_eos"] == 5 + 4
    assert direct["gen_ppl"] > 1 and direct["gen_ppl_no_eos"] > 1 and "first EOS" in direct["gen_ppl_rule"]
