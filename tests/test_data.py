"""The data pipeline: packing, the grain dataset (batches, processes, resume, streaming), `prepare` / array_record
and the CLI on prepared shards. Tokenizers and sources are in test_tokenizers.py / test_sources.py."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from dlm_jax.data import pipeline, prepare, sources, tokenizers
from dlm_jax.errors import UserError
from tests.data_helpers import (
    SEQ_LEN,
    TRAIN_ROWS,
    VAL_ROWS,
    collect,
    data_config,
    one_line,
    sorted_rows,
    stack,
    text_config,
    user_error,
    write_jsonl,
)
from tests.helpers import ROOT, small_corpus

# ----------------------------------------------------------------------------------------------
# Packing


def _docs(*lists):
    return [np.array(x, np.int32) for x in lists]


@pytest.mark.parametrize("buffer_tokens", [1 << 20, 5])
def test_pack_wrap_concatenates_with_eos_and_drops_the_last_partial_row(monkeypatch, buffer_tokens):
    monkeypatch.setattr(pipeline, "_WRAP_BUFFER_TOKENS", buffer_tokens)  # 5: rows cut in several blocks
    docs = _docs([1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11])
    blocks = list(pipeline.pack(docs, 4, "wrap", eos_id=99, pad_id=98))
    tokens, mask = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
    # 1 2 3 E | 4 5 E 6 | 7 8 9 10 | E 11 E (partial: dropped)
    assert tokens.tolist() == [[1, 2, 3, 99], [4, 5, 99, 6], [7, 8, 9, 10]]
    assert tokens.dtype == np.int32 and mask.dtype == np.float32 and mask.shape == (3, 4) and mask.min() == 1
    assert (len(blocks) == 1) == (buffer_tokens > 100)
    assert list(pipeline.pack(_docs([1, 2]), 4, "wrap", 99, 98)) == []  # shorter than one row


def test_pack_pad_truncates_keeping_room_for_eos():
    docs = _docs([1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [], [11, 12, 13, 14])
    blocks = list(pipeline.pack(docs, 5, "pad", eos_id=99, pad_id=98, block_rows=3))
    assert [len(b[0]) for b in blocks] == [3, 1]
    tokens, mask = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
    assert tokens.tolist() == [[1, 2, 3, 99, 98], [4, 5, 6, 7, 99], [99, 98, 98, 98, 98], [11, 12, 13, 14, 99]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert mask.dtype == np.float32
    with user_error("unknown data.packing 'nope'"):
        list(pipeline.pack(docs, 5, "nope", 99, 98))


def test_array_rows_from_text_files_are_the_text_cut_into_rows(corpus, corpus_text):
    rows = pipeline.load_rows(text_config(corpus), tokenizers.ByteTokenizer(), "train")
    flat = np.append(np.frombuffer(corpus_text[:5400].encode(), np.uint8).astype(np.int32), 256)
    assert len(rows) == TRAIN_ROWS == 168
    np.testing.assert_array_equal(rows.tokens, flat[: TRAIN_ROWS * SEQ_LEN].reshape(TRAIN_ROWS, SEQ_LEN))
    assert rows[5]["tokens"].tolist() == flat[5 * SEQ_LEN : 6 * SEQ_LEN].tolist() and rows[5]["loss_mask"].sum() == 32
    assert len(pipeline.load_rows(text_config(corpus), tokenizers.ByteTokenizer(), "validation")) == VAL_ROWS == 18


# ----------------------------------------------------------------------------------------------
# make_dataset


def _dataset(data, split="train", batch_size=8, *, shuffle=True, repeat=True, process_index=0, process_count=1,
             seed=0, tokenizer=None):
    return pipeline.make_dataset(data, tokenizer or tokenizers.ByteTokenizer(), split, batch_size, seed=seed,
                                 shuffle=shuffle, repeat=repeat, process_index=process_index,
                                 process_count=process_count)


def test_make_dataset_batches_and_eval_order(corpus):
    data = text_config(corpus)
    batch = next(iter(_dataset(data)))
    assert set(batch) == {"tokens", "loss_mask"}
    assert batch["tokens"].shape == batch["loss_mask"].shape == (8, SEQ_LEN)
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    assert batch["loss_mask"].min() == 1 and 0 <= batch["tokens"].min() and batch["tokens"].max() <= 256

    val_rows = pipeline.load_rows(data, tokenizers.ByteTokenizer(), "validation").tokens
    batches = collect(_dataset(data, "validation", shuffle=False, repeat=False))
    assert len(batches) == math.ceil(VAL_ROWS / 8) == 3
    tokens, mask = stack(batches), stack(batches, "loss_mask")
    np.testing.assert_array_equal(tokens[:VAL_ROWS], val_rows)  # in order
    assert mask[:VAL_ROWS].min() == 1 and not mask[VAL_ROWS:].any() and not tokens[VAL_ROWS:].any()
    assert collect(_dataset(data, "validation", shuffle=False, repeat=False))[2]["loss_mask"].sum() == 2 * SEQ_LEN


def test_two_processes_see_exactly_the_one_process_batches(corpus):
    data = text_config(corpus)
    num = TRAIN_ROWS // 8 + 3  # past the end of the first epoch
    single = collect(_dataset(data, batch_size=8), num)
    halves = [collect(_dataset(data, batch_size=4, process_index=p, process_count=2), num) for p in (0, 1)]
    for one, p0, p1 in zip(single, *halves, strict=True):
        for key in ("tokens", "loss_mask"):
            np.testing.assert_array_equal(one[key], np.concatenate([p0[key], p1[key]]))
    assert not np.array_equal(single[0]["tokens"], single[1]["tokens"])

    val_rows = pipeline.load_rows(data, tokenizers.ByteTokenizer(), "validation").tokens
    single = collect(_dataset(data, "validation", batch_size=8, shuffle=False, repeat=False))
    halves = [collect(_dataset(data, "validation", batch_size=4, shuffle=False, repeat=False, process_index=p,
                               process_count=2)) for p in (0, 1)]
    assert len(single) == len(halves[0]) == len(halves[1]) == 3
    for one, p0, p1 in zip(single, *halves, strict=True):
        for key in ("tokens", "loss_mask"):
            np.testing.assert_array_equal(one[key], np.concatenate([p0[key], p1[key]]))
    # process 1's share of the last global batch (rows 20..23 of 18) is all padding
    assert not halves[1][-1]["loss_mask"].any() and halves[0][-1]["loss_mask"].sum() == 2 * SEQ_LEN
    tokens = np.concatenate([stack(h) for h in halves])
    real = stack(halves[0], "loss_mask").sum(1) > 0
    real = np.concatenate([real, stack(halves[1], "loss_mask").sum(1) > 0])
    assert real.sum() == VAL_ROWS and sorted_rows(tokens[real]) == sorted_rows(val_rows)


def test_iterator_state_resumes_exactly(corpus):
    data = text_config(corpus)
    it = iter(_dataset(data, seed=3))
    for _ in range(TRAIN_ROWS // 8 + 2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
    expected = [next(it) for _ in range(4)]
    resumed = iter(_dataset(data, seed=3))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
        np.testing.assert_array_equal(got["loss_mask"], want["loss_mask"])
    fresh = next(iter(_dataset(data, seed=3)))
    assert not np.array_equal(fresh["tokens"], expected[0]["tokens"])


def test_shuffle_is_a_new_permutation_every_epoch(corpus):
    data = text_config(corpus)
    rows = pipeline.load_rows(data, tokenizers.ByteTokenizer(), "train").tokens
    assert len(set(map(tuple, rows.tolist()))) == TRAIN_ROWS  # rows are distinct
    assert TRAIN_ROWS % 8 == 0
    tokens = stack(collect(_dataset(data, seed=0), 2 * TRAIN_ROWS // 8))
    first, second = tokens[:TRAIN_ROWS], tokens[TRAIN_ROWS:]
    assert sorted_rows(first) == sorted_rows(second) == sorted_rows(rows)  # each epoch: every row once
    assert not np.array_equal(first, second) and not np.array_equal(first, rows)
    other_seed = stack(collect(_dataset(data, seed=1), 1))
    assert not np.array_equal(other_seed, tokens[:8])
    unshuffled = stack(collect(_dataset(data, shuffle=False), TRAIN_ROWS // 8 + 1))
    np.testing.assert_array_equal(unshuffled[:TRAIN_ROWS], rows)
    np.testing.assert_array_equal(unshuffled[TRAIN_ROWS:], rows[:8])


def test_corpus_shorter_than_one_sequence_is_a_one_line_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 300, encoding="utf-8")  # val: 30 chars + EOS < 32
    data = text_config(path)
    assert len(pipeline.load_rows(data, tokenizers.ByteTokenizer(), "train")) == (270 + 1) // SEQ_LEN
    with pytest.raises(UserError) as excinfo:
        _dataset(data, "validation", repeat=False)
    assert "data.seq_len=32" in one_line(excinfo) and "validation" in one_line(excinfo)


def test_streaming_batches_eval_padding_processes_and_resume(offline, tmp_path):
    docs = [f"doc {i:02d}" for i in range(20)]  # 6 bytes + EOS = 7 tokens each; pad packing: a row each
    write_jsonl(tmp_path / "docs.jsonl", docs)
    data = data_config("source=hf", f"path={tmp_path / 'docs.jsonl'}", "streaming=True", "streaming_val_documents=5",
                       "seq_len=8", "packing=pad")
    tok = tokenizers.ByteTokenizer()
    want = np.array([[*d.encode(), 256, 257] for d in docs], np.int32)

    batches = collect(_dataset(data, "validation", batch_size=4, repeat=False))
    assert len(batches) == 2  # 5 rows: the last batch holds 1 row and 3 of loss_mask 0
    tokens, mask = stack(batches), stack(batches, "loss_mask")
    np.testing.assert_array_equal(tokens[:5], want[:5])
    assert mask[:5].sum(1).tolist() == [7] * 5 and not mask[5:].any()
    halves = [collect(_dataset(data, "validation", batch_size=2, repeat=False, process_index=p, process_count=2))
              for p in (0, 1)]
    for one, p0, p1 in zip(batches, *halves, strict=True):
        np.testing.assert_array_equal(one["tokens"], np.concatenate([p0["tokens"], p1["tokens"]]))

    it = iter(_dataset(data, batch_size=4, tokenizer=tok))
    first = [next(it) for _ in range(5)]  # 15 train rows: the 4th batch wraps into the second pass
    np.testing.assert_array_equal(stack(first)[:15], want[5:])
    np.testing.assert_array_equal(stack(first)[15:], want[5:10])
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    resumed = iter(_dataset(data, batch_size=4, tokenizer=tok))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"])


# ----------------------------------------------------------------------------------------------
# prepare + array_record


@pytest.mark.parametrize("packing", ["wrap", "pad"])
def test_prepare_then_array_record_gives_the_same_rows(corpus, tmp_path, packing):
    extra = ("packing=pad", "document_per_line=True") if packing == "pad" else ()
    data = text_config(corpus, *extra)
    out = tmp_path / "prepared"
    summary = prepare.prepare(data, str(out), num_shards=2)
    memory = {s: pipeline.load_rows(data, tokenizers.ByteTokenizer(), s) for s in sources.SPLITS}
    assert summary["output_dir"] == str(out)
    for split in sources.SPLITS:
        assert summary["splits"][split] == {"rows": len(memory[split]), "tokens": int(memory[split].loss_mask.sum())}
    if packing == "wrap":
        assert summary["splits"] == {"train": {"rows": 168, "tokens": 168 * 32}, "validation": {"rows": 18,
                                                                                              "tokens": 18 * 32}}
    assert sorted(os.listdir(out)) == ["meta.json", *[f"{s}-0000{i}-of-00002.array_record"
                                                      for s in ("train", "validation") for i in (0, 1)]]
    assert not os.path.exists(f"{out}.incomplete")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seq_len"] == SEQ_LEN and meta["tokenizer"] == "byte" and meta["packing"] == packing

    stored = data_config("source=array_record", f"path={out}", f"seq_len={SEQ_LEN}", *extra[:1])
    for split in sources.SPLITS:
        rows = pipeline.load_rows(stored, tokenizers.ByteTokenizer(), split)
        mem = memory[split]
        assert len(rows) == len(mem)
        # rows are dealt round-robin to 2 shards: shard 0 holds rows 0, 2, 4, ...; shard 1 rows 1, 3, ...
        order = np.concatenate([np.arange(0, len(mem), 2), np.arange(1, len(mem), 2)])
        np.testing.assert_array_equal(np.stack([rows[i]["tokens"] for i in range(len(rows))]), mem.tokens[order])
        np.testing.assert_array_equal(np.stack([rows[i]["loss_mask"] for i in range(len(rows))]),
                                      mem.loss_mask[order])
        batches = collect(_dataset(stored, split, shuffle=False, repeat=False))
        tokens, mask = stack(batches), stack(batches, "loss_mask")
        real = mask.sum(1) > 0
        assert real.sum() == len(mem) and sorted_rows(tokens[real]) == sorted_rows(mem.tokens)
        assert mask.dtype == np.float32 and sorted_rows(mask[real]) == sorted_rows(mem.loss_mask)


def test_prepare_and_array_record_errors_are_one_line(corpus, tmp_path):
    data = text_config(corpus)
    out = tmp_path / "prepared"
    prepare.prepare(data, str(out), num_shards=1)
    with pytest.raises(UserError) as excinfo:
        prepare.prepare(data, str(out), num_shards=1)
    assert "already holds a prepared dataset" in one_line(excinfo)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(UserError) as excinfo:
        prepare.prepare(data, str(tmp_path / "busy"), num_shards=1)
    assert "not empty" in one_line(excinfo)
    assert os.listdir(tmp_path / "busy") == ["keep.txt"] and not os.path.exists(tmp_path / "busy.incomplete")
    (tmp_path / "empty").mkdir()
    assert prepare.prepare(data, str(tmp_path / "empty"), num_shards=1)["splits"]["validation"]["rows"] == VAL_ROWS
    with pytest.raises(UserError) as excinfo:
        prepare.prepare(data_config("source=array_record", f"path={out}"), str(tmp_path / "again"))
    assert "already array_record" in one_line(excinfo)
    with pytest.raises(UserError) as excinfo:
        prepare.prepare(data, str(tmp_path / "zero"), num_shards=0)
    assert "--num_shards" in one_line(excinfo)

    def read(*overrides, tokenizer=None):
        stored = data_config("source=array_record", f"path={out}", f"seq_len={SEQ_LEN}", *overrides)
        return pipeline.load_rows(stored, tokenizer or tokenizers.ByteTokenizer(), "train")

    assert len(read()) == TRAIN_ROWS
    for overrides, tokenizer, key in [(["seq_len=64"], None, "seq_len=32"), (["packing=pad"], None, "packing='wrap'"),
                                      ([], tokenizers.CharTokenizer(), "tokenizer='byte'")]:
        with pytest.raises(UserError) as excinfo:
            read(*overrides, tokenizer=tokenizer)
        assert key in one_line(excinfo)
    with pytest.raises(UserError) as excinfo:
        pipeline.load_rows(data_config("source=array_record", f"path={tmp_path}"), tokenizers.ByteTokenizer(),
                           "train")
    assert "has no meta.json" in one_line(excinfo)


def test_prepare_too_short_split_is_an_error_and_leaves_nothing(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 300, encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        prepare.prepare(text_config(path), str(tmp_path / "out"))
    assert "data.seq_len=32" in one_line(excinfo)
    assert sorted(os.listdir(tmp_path)) == ["short.txt"]


# ----------------------------------------------------------------------------------------------
# The CLI: prepare, then train on the prepared shards


TINY = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.data.seq_len=32", "--config.train.batch_size=8",
        "--config.eval.batch_size=8", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
        "--config.eval.num_batches=2", "--config.mesh.data=-1"]


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "dlm_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_prepare_then_train_on_array_record(tmp_path):
    corpus = small_corpus(tmp_path)  # 60k chars; the recipe's val_fraction is 0.1
    out = str(tmp_path / "prepared")
    summary = _cli("prepare", "--config=configs/shakespeare_mdlm.py", f"--output_dir={out}",
                   f"--config.data.path={corpus}", "--config.data.seq_len=32", "--num_shards=2")
    assert summary["splits"] == {"train": {"rows": 54001 // 32, "tokens": 54001 // 32 * 32},
                                 "validation": {"rows": 6001 // 32, "tokens": 6001 // 32 * 32}}
    assert summary["output_dir"] == out and summary["tokenizer"] == "byte"
    workdir = str(tmp_path / "run")
    metrics = _cli("train", "--config=configs/shakespeare_mdlm.py", f"--workdir={workdir}",
                   "--config.data.source=array_record", f"--config.data.path={out}", "--config.train.num_steps=2",
                   "--config.train.eval_every=2", *TINY)
    assert metrics["workdir"] == workdir and math.isfinite(metrics["loss"]) and 0 < metrics["val_nelbo"] < 10
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert sorted({r["step"] for r in records}) == [1, 2] and any("val_nelbo" in r for r in records)
