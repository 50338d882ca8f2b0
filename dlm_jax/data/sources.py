"""Document sources: where the raw text of the train and val splits comes from.

  python_stdlib  the embedded default: the running Python's standard-library `.py` files (always present,
                 offline), split train/val by a hash of each file's path
  text_files     a glob in `data.path` (one file: its last `val_fraction` is val; several: split by path hash)
  tfds           `tfds.data_source(data.name)` (array_record format), `data.path` = the tfds data_dir
  hf             HF `datasets`: `data.name` (hub) or `data.path` (a local `save_to_disk` dir or data files)
  array_record   already tokenized rows written by `dlm-jax prepare` (read in `pipeline.py`, not here)

A source returns a `Documents` object: `len()` and `[i] -> str`, read lazily where the backend allows it; or,
for HF streaming, an iterable of strings (`StreamingDocuments`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections

from dlm_jax import fileio
from dlm_jax.errors import UserError

SPLITS = ("train", "validation")
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class Documents(Sequence):
    """A lazy view `[i] -> str` over rows `indices` of an indexable `base`, text taken by `to_text`."""

    def __init__(self, base: Any, indices: Sequence[int], to_text: Callable[[Any], str] = str):
        self._base, self._indices, self._to_text = base, indices, to_text

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Documents(self._base, self._indices[i], self._to_text)
        return self._to_text(self._base[self._indices[i]])


class StreamingDocuments:
    """An iterable of strings that can be re-opened from the start (HF streaming datasets)."""

    def __init__(self, open_stream: Callable[[], Iterator[str]]):
        self._open = open_stream

    def __iter__(self) -> Iterator[str]:
        return self._open()


def _path_hash(path: str) -> int:
    return int(hashlib.md5(path.encode("utf-8")).hexdigest()[:8], 16)


def _num_val(n: int, val_fraction: float) -> int:
    if n < 2:
        return 0
    return min(n - 1, max(1, math.ceil(val_fraction * n)))


def _split_by_hash(paths: list[str], split: str, data: ml_collections.ConfigDict, root: str = "") -> list[str]:
    """Files ordered by a hash of their (relative) path; the first `val_fraction` of them (>= 1) is val."""
    ordered = sorted(paths, key=lambda p: (_path_hash(os.path.relpath(p, root) if root else p), p))
    if data.max_documents > 0:
        ordered = ordered[: data.max_documents]
    n_val = _num_val(len(ordered), data.val_fraction)
    return ordered[:n_val] if split == "validation" else ordered[n_val:]


def python_stdlib(data: ml_collections.ConfigDict, split: str) -> Documents:
    """The `.py` files of the running Python's standard library (tests and site-packages left out)."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS)
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not paths:
        raise UserError(f"no .py files under the Python standard library {root!r}; use data.source=text_files")
    chosen = _split_by_hash(paths, split, data, root)
    return Documents(chosen, range(len(chosen)), fileio.read_text)


class _TextSlice:
    """The [start, end) characters of a file: the train or val part of a single-file corpus."""

    def __init__(self, path: str, split: str, val_fraction: float):
        self.path, self.split, self.val_fraction = path, split, val_fraction

    def read(self) -> str:
        text = fileio.read_text(self.path)
        cut = len(text) - int(len(text) * self.val_fraction)
        return text[cut:] if self.split == "validation" else text[:cut]


def _check_size(paths: list[str], data: ml_collections.ConfigDict) -> None:
    """text_files holds the tokenized corpus in memory (about 10x its bytes in RAM): above data.max_text_mb it is a
    one-line error pointing at the streaming reader, before anything is read."""
    size_mb = sum(fileio.as_path(p).stat().length for p in paths) / 2**20
    if 0 < data.max_text_mb < size_mb:
        raise UserError(
            f"data.path={data.path!r} holds {size_mb:.0f} MB of text, over data.max_text_mb={data.max_text_mb} "
            "(source=text_files reads it whole: about 10x that in RAM); stream it with --config.data.source=hf "
            "--config.data.streaming=True (same data.path), or `dlm-jax prepare` it that way into array_record "
            "shards, or raise data.max_text_mb")


def text_files(data: ml_collections.ConfigDict, split: str) -> Documents:
    """Files matching the glob `data.path`; each file is a document (each line with `data.document_per_line`)."""
    pattern = fileio.expand(data.path)
    paths = fileio.glob_files(pattern)
    if not paths:
        raise UserError(f"data.path={data.path!r} matches no files; give a text file or a glob like 'dir/*.txt'")
    if all(fileio.as_path(p).stat().length == 0 for p in paths):
        raise UserError(f"data.path={data.path!r}: every matching file is empty")
    _check_size(paths, data)
    if len(paths) == 1:
        texts = [_TextSlice(paths[0], split, data.val_fraction).read()]
    else:
        root = os.path.dirname(re.split(r"[*?[]", pattern, maxsplit=1)[0])  # hash paths below the glob's directory
        texts = [fileio.read_text(p) for p in _split_by_hash(paths, split, data, root)]
    if data.document_per_line:
        texts = [line for text in texts for line in text.splitlines() if line.strip()]
        if data.max_documents > 0:
            texts = texts[: data.max_documents]
    return Documents(texts, range(len(texts)))


def _carve(n: int, split: str, data: ml_collections.ConfigDict) -> range:
    """Row range of `split` inside a corpus of n rows that has no val split of its own: val is the tail."""
    if data.max_documents > 0:
        n = min(n, data.max_documents)
    n_val = _num_val(n, data.val_fraction)
    return range(n - n_val, n) if split == "validation" else range(n - n_val)


def _limit(n: int, data: ml_collections.ConfigDict) -> range:
    return range(min(n, data.max_documents) if data.max_documents > 0 else n)


def _decode(text_key: str) -> Callable[[Any], str]:
    def to_text(example: Any) -> str:
        value = example[text_key]
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

    return to_text


def _open_error(what: str, e: Exception) -> UserError:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return UserError(f"cannot open {what}: {type(e).__name__}: {first}")


def _pick_split(splits: dict, split: str, data: ml_collections.ConfigDict,
                where: str) -> Documents | StreamingDocuments:
    """The `split` of a dataset given as {split name: rows}. Without a val split of its own (openwebtext) the
    val documents are carved from the tail of the train split, and train keeps the rest."""
    if data.train_split not in splits:
        raise UserError(f"{where} has no split {data.train_split!r} (has {sorted(splits)}); set data.train_split")
    carve = data.val_split not in splits or data.val_split == data.train_split
    dataset = splits[data.train_split if carve or split == "train" else data.val_split]
    to_text = _decode(data.text_key)
    columns = getattr(dataset, "column_names", None)  # None: tfds, or a stream of unknown features
    if columns is not None and data.text_key not in columns:
        raise UserError(f"{where} has no column {data.text_key!r} (has {columns}); set data.text_key")
    if not hasattr(dataset, "__len__"):  # HF streaming
        return _streaming(dataset, split, carve, data, to_text)
    rows = _carve(len(dataset), split, data) if carve else _limit(len(dataset), data)
    return Documents(dataset, rows, to_text)


def tfds_source(data: ml_collections.ConfigDict, split: str) -> Documents:
    """A tfds dataset read through `tfds.data_source` (random access; downloads and prepares it in
    array_record format the first time when the network allows)."""
    import tensorflow_datasets as tfds

    if not data.name:
        raise UserError("data.source='tfds' needs --config.data.name=DATASET (e.g. lm1b)")
    data_dir = fileio.expand(data.path) if data.path else None
    try:
        splits = tfds.data_source(data.name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 -- not found / not prepared / no network: one line
        raise _open_error(f"tfds dataset {data.name!r} (data_dir={data_dir})", e) from e
    return _pick_split(dict(splits), split, data, f"tfds dataset {data.name!r}")


def hf_source(data: ml_collections.ConfigDict, split: str) -> Documents | StreamingDocuments:
    """HF datasets: a `save_to_disk` directory or data files (json/jsonl/parquet/csv/txt glob) in `data.path`,
    else `load_dataset(data.name, data.hf_config)` from the hub (streaming with `data.streaming`)."""
    import datasets

    path = fileio.expand(data.path)
    where = f"HF dataset {data.name or path!r}"
    try:
        if path and fileio.as_path(fileio.join(path, "dataset_dict.json")).is_file():
            splits = dict(datasets.load_from_disk(path))
        elif path and fileio.as_path(fileio.join(path, "dataset_info.json")).is_file():
            splits = {data.train_split: datasets.load_from_disk(path)}
        elif path:
            files = fileio.glob_files(path)
            if not files:
                raise UserError(f"data.path={data.path!r} matches no files (nor a save_to_disk directory)")
            builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(
                os.path.splitext(files[0])[1], "text")
            splits = dict(datasets.load_dataset(builder, data_files={data.train_split: files},
                                                streaming=data.streaming))
        elif data.name:
            splits = dict(datasets.load_dataset(data.name, data.hf_config or None, streaming=data.streaming))
        else:
            raise UserError("data.source='hf' needs --config.data.name=HUB_NAME or --config.data.path=LOCAL_PATH")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- offline hub, bad files: one line
        raise _open_error(where, e) from e
    return _pick_split(splits, split, data, where)


def _streaming(dataset: Any, split: str, carve: bool, data: ml_collections.ConfigDict,
               to_text: Callable[[Any], str]) -> StreamingDocuments:
    """Streaming: without a val split the first `data.streaming_val_documents` documents are val."""

    def open_stream() -> Iterator[str]:
        stream = dataset
        if carve:
            n_val = data.streaming_val_documents
            stream = stream.take(n_val) if split == "validation" else stream.skip(n_val)
        if data.max_documents > 0:
            stream = stream.take(data.max_documents)
        return (to_text(example) for example in stream)

    return StreamingDocuments(open_stream)


SOURCES: dict[str, Callable[[ml_collections.ConfigDict, str], Documents | StreamingDocuments]] = {
    "python_stdlib": python_stdlib,
    "text_files": text_files,
    "tfds": tfds_source,
    "hf": hf_source,
}


def load_documents(data: ml_collections.ConfigDict, split: str) -> Documents | StreamingDocuments:
    """The documents of `split` ('train' or 'validation') of the source `data.source`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data.source not in SOURCES:
        raise UserError(f"data.source={data.source!r} holds no raw documents (array_record is read by the pipeline)")
    return SOURCES[data.source](data, split)
