"""Offline preprocessing: tokenize and pack a corpus once into array_record shards.

  dlm-jax prepare --config=configs/mdlm_owt.py --output_dir=/data/owt_gpt2_1024 [--num_shards=16]
  dlm-jax train --config=configs/mdlm_owt.py --config.data.source=array_record --config.data.path=/data/owt_gpt2_1024

Writes `{train,validation}-<i>-of-<n>.array_record` (one packed row per record, rows dealt round-robin to
shards) and `meta.json` (tokenizer, seq_len, packing, row counts), which the reader checks against the
config so a corpus is never read with another tokenizer or length. Documents stream through, so a corpus
larger than memory is fine. `--output_dir` may be a gs:// URI: the shards are written locally, then uploaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import ml_collections
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from dlm_jax import fileio
from dlm_jax.data import pipeline, sources, tokenizers
from dlm_jax.errors import UserError


def prepare(data: ml_collections.ConfigDict, output_dir: str, num_shards: int = 4) -> dict:
    """Writes both splits of `data` to `output_dir`; returns a summary (rows and tokens per split)."""
    if data.source == "array_record":
        raise UserError("data.source is already array_record; prepare reads a raw source (text_files, hf, tfds, ...)")
    if num_shards < 1:
        raise UserError(f"--num_shards must be >= 1, got {num_shards}")
    output_dir = fileio.expand(output_dir)
    output = fileio.as_path(output_dir)
    if (output / pipeline.META_FILE).exists():
        raise UserError(f"{output_dir!r} already holds a prepared dataset; remove it or pick another --output_dir")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output_dir={output_dir!r} is an existing file, not a directory; give a new directory")
    if fileio.file_above(output_dir):
        raise UserError(f"--output_dir={output_dir!r} lies under the regular file {fileio.file_above(output_dir)!r}; "
                        "give a directory path")
    if output.is_dir() and any(output.iterdir()):
        raise UserError(f"--output_dir={output_dir!r} is not empty; give a new or empty directory")
    tokenizer = tokenizers.get_tokenizer(data)
    # shards are written locally (next to a local output, in a temp dir for a cloud one), then moved in place
    if fileio.is_cloud(output_dir):
        staging = tempfile.mkdtemp(prefix="dlm_jax_prepare_")
    else:
        staging = output_dir.rstrip("/") + ".incomplete"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    try:
        summary = _write_splits(data, tokenizer, staging, num_shards)
    except BaseException:  # an error or Ctrl-C leaves no half-written staging directory behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if fileio.is_cloud(output_dir):
        _upload(staging, output)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
        if os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
        os.rename(staging, output_dir)
    return {"output_dir": output_dir, **summary}


def _upload(staging: str, output: epath.Path) -> None:
    """Copies the staged files to cloud storage, meta.json last (a dataset without it is never read), then
    removes the local staging directory."""
    output.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(staging), key=lambda name: name == pipeline.META_FILE)
    for name in tqdm.tqdm(names, desc=f"uploading to {output}", unit="file"):
        with open(os.path.join(staging, name), "rb") as src, (output / name).open("wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    shutil.rmtree(staging)


def _write_splits(data: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer, staging: str,
                  num_shards: int) -> dict:
    """Tokenizes, packs and writes both splits as array_record shards plus meta.json into `staging`."""
    summary = {**tokenizer.describe(), "seq_len": data.seq_len, "packing": data.packing, "source": data.source,
               "splits": {}}
    for split in sources.SPLITS:
        docs = sources.load_documents(data, split)
        writers = [ArrayRecordWriter(os.path.join(staging, f"{split}-{i:05d}-of-{num_shards:05d}.array_record"),
                                     "group_size:1") for i in range(num_shards)]
        rows = tokens = 0
        packed = pipeline.pack(pipeline.tokenize(docs, tokenizer, desc=f"preparing {split}"), data.seq_len,
                               data.packing, tokenizer.eos_id, tokenizer.pad_id)
        for block_tokens, block_mask in packed:
            for row_tokens, row_mask in zip(block_tokens, block_mask, strict=True):
                writers[rows % num_shards].write(pipeline.row_to_record(row_tokens, row_mask))
                rows += 1
            tokens += int(block_mask.sum())
        for writer in writers:
            writer.close()
        if rows == 0:
            raise UserError(f"the {split} split is shorter than one sequence of data.seq_len={data.seq_len} tokens")
        summary["splits"][split] = {"rows": rows, "tokens": tokens}
    with open(os.path.join(staging, pipeline.META_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary

