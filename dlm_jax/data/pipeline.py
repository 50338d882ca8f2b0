"""The grain input pipeline: documents -> token ids -> packed rows -> per-process batches.

Batches are `{'tokens': int32[b, L], 'loss_mask': float32[b, L]}` with b = the per-process batch. Packing:
  wrap  concatenate documents, each followed by EOS, and cut rows of L (OWT style; every position counts)
  pad   one document per row, EOS appended, truncated to L, padded with PAD (LM1B style; PAD has mask 0)
Rows come from memory (sources tokenized at start-up) or from array_record shards written by
`dlm-jax prepare`; either way a grain `MapDataset` shuffles them (a new permutation every epoch), and each
process reads its slice of every global batch, so P processes see exactly the rows one process would.
The iterator state (grain's `get_state()`) is saved with every checkpoint for exact resume.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence

import grain
import ml_collections
import numpy as np
import tqdm

from dlm_jax import fileio
from dlm_jax.data import sources
from dlm_jax.data.tokenizers import Tokenizer
from dlm_jax.errors import UserError

Batch = dict[str, np.ndarray]
_WRAP_BUFFER_TOKENS = 1 << 20  # tokens gathered before a wrap block of rows is cut

# ----------------------------------------------------------------------------------------------
# Tokenizing and packing (shared with prepare.py)


def tokenize(docs: Sequence[str] | Iterable[str], tokenizer: Tokenizer, desc: str = "tokenizing",
             chunk: int = 256) -> Iterator[np.ndarray]:
    """Token ids of each document, in order, encoded `chunk` documents at a time (with a progress bar)."""
    total = len(docs) if hasattr(docs, "__len__") else None
    bar = tqdm.tqdm(total=total, desc=desc, unit="doc", file=sys.stderr, leave=False,
                    disable=total is not None and total < 2000)
    pending: list[str] = []
    for doc in docs:
        pending.append(doc)
        if len(pending) == chunk:
            yield from tokenizer.encode_batch(pending)
            bar.update(len(pending))
            pending = []
    if pending:
        yield from tokenizer.encode_batch(pending)
        bar.update(len(pending))
    bar.close()


def pack(token_docs: Iterable[np.ndarray], seq_len: int, packing: str, eos_id: int, pad_id: int,
         block_rows: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Packs documents into blocks of rows: (tokens int32[n, L], loss_mask float32[n, L]).

    wrap drops the last partial row; pad truncates documents longer than L - 1 (EOS always fits).
    """
    eos = np.array([eos_id], np.int32)
    if packing == "wrap":
        buffer: list[np.ndarray] = []
        buffered = 0
        for ids in token_docs:
            buffer += [ids.astype(np.int32), eos]
            buffered += len(ids) + 1
            if buffered >= max(_WRAP_BUFFER_TOKENS, seq_len):
                flat = np.concatenate(buffer)
                n = len(flat) // seq_len
                yield flat[: n * seq_len].reshape(n, seq_len), np.ones((n, seq_len), np.float32)
                buffer, buffered = [flat[n * seq_len :]], len(flat) - n * seq_len
        flat = np.concatenate(buffer) if buffer else np.zeros((0,), np.int32)
        n = len(flat) // seq_len
        if n:
            yield flat[: n * seq_len].reshape(n, seq_len), np.ones((n, seq_len), np.float32)
    elif packing == "pad":
        tokens, masks = [], []
        for ids in token_docs:
            row = np.concatenate([ids[: seq_len - 1].astype(np.int32), eos])
            tokens.append(np.pad(row, (0, seq_len - len(row)), constant_values=pad_id))
            masks.append((np.arange(seq_len) < len(row)).astype(np.float32))
            if len(tokens) == block_rows:
                yield np.stack(tokens), np.stack(masks)
                tokens, masks = [], []
        if tokens:
            yield np.stack(tokens), np.stack(masks)
    else:
        raise UserError(f"unknown data.packing {packing!r}; choose wrap or pad")


# ----------------------------------------------------------------------------------------------
# Rows: random access to packed rows, in memory or in array_record shards


class ArrayRows:
    """Packed rows held in memory."""

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray):
        self.tokens, self.loss_mask = tokens, loss_mask

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> Batch:
        return {"tokens": self.tokens[i], "loss_mask": self.loss_mask[i]}


def row_to_record(tokens: np.ndarray, loss_mask: np.ndarray) -> bytes:
    """One array_record record: int32 little-endian tokens, then the loss mask as uint8."""
    return tokens.astype("<i4").tobytes() + loss_mask.astype(np.uint8).tobytes()


def record_to_row(record: bytes, seq_len: int) -> Batch:
    tokens = np.frombuffer(record, "<i4", count=seq_len).astype(np.int32)
    mask = np.frombuffer(record, np.uint8, offset=4 * seq_len, count=seq_len).astype(np.float32)
    return {"tokens": tokens, "loss_mask": mask}


META_FILE = "meta.json"


class ArrayRecordRows:
    """Rows of one split of a directory written by `dlm-jax prepare` (checked against the config first)."""

    def __init__(self, directory: str, split: str, tokenizer: Tokenizer, data: ml_collections.ConfigDict):
        meta_path = fileio.join(directory, META_FILE)
        if not fileio.as_path(meta_path).is_file():
            raise UserError(f"data.path={directory!r} has no {META_FILE}: write it with `dlm-jax prepare "
                            f"--config=... --output_dir={directory}`")
        meta = json.loads(fileio.read_text(meta_path))
        want = {**tokenizer.describe(), "seq_len": data.seq_len, "packing": data.packing}
        for key, value in want.items():
            if meta.get(key) != value:
                raise UserError(f"{directory!r} was prepared with {key}={meta.get(key)!r} but the config has "
                                f"{value!r}; prepare it again or change the config")
        paths = fileio.glob_files(fileio.join(directory, f"{split}-*.array_record"))
        if not paths:
            raise UserError(f"{directory!r} has no {split}-*.array_record shards; run `dlm-jax prepare` again")
        self.seq_len = data.seq_len
        self._source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> Batch:
        return record_to_row(self._source[i], self.seq_len)


def load_rows(data: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str) -> ArrayRows | ArrayRecordRows:
    """All rows of `split`: array_record shards as they are, any other source tokenized and packed now."""
    if data.source == "array_record":
        rows = ArrayRecordRows(fileio.expand(data.path), split, tokenizer, data)
    else:
        docs = sources.load_documents(data, split)
        blocks = list(pack(tokenize(docs, tokenizer, desc=f"tokenizing {split}"), data.seq_len, data.packing,
                           tokenizer.eos_id, tokenizer.pad_id))
        if not blocks:
            raise UserError(f"the {split} split of data.source={data.source!r} (data.path={data.path!r}) is shorter "
                            f"than one sequence of data.seq_len={data.seq_len} tokens; use more data or a "
                            "smaller data.seq_len")
        rows = ArrayRows(np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]))
    if len(rows) == 0:
        raise UserError(f"the {split} split of data.path={data.path!r} has no rows")
    return rows


# ----------------------------------------------------------------------------------------------
# Per-process views and the datasets the train loop iterates


class _ProcessView(grain.MapDataset):
    """Process p's rows of each global batch: local i -> global (i // b) * b * P + p * b + i % b.

    Rows past the end of a finite parent (eval) are empty rows with loss_mask 0, so the last global batch
    is full and every val token is counted exactly once.
    """

    def __init__(self, parent: grain.MapDataset, local_batch: int, process_index: int, process_count: int,
                 num_rows: int):
        super().__init__(parent)
        self._b, self._p, self._n = local_batch, process_index, process_count
        self._num_rows = num_rows
        global_batch = local_batch * process_count
        self._len = -(-num_rows // global_batch) * local_batch if num_rows < sys.maxsize else sys.maxsize

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        global_index = (index // self._b) * self._b * self._n + self._p * self._b + index % self._b
        if global_index >= self._num_rows:
            row = self._parent[0]
            return {"tokens": np.zeros_like(row["tokens"]), "loss_mask": np.zeros_like(row["loss_mask"])}
        return self._parent[global_index]


class _StreamingBatches(grain.IterDataset):
    """Batches packed on the fly from a stream of documents (HF streaming). State = batches consumed; a resume
    re-opens the stream and skips them (exact, at the cost of re-reading)."""

    def __init__(self, docs: sources.StreamingDocuments, tokenizer: Tokenizer, data: ml_collections.ConfigDict,
                 local_batch: int, process_index: int, process_count: int, repeat: bool):
        super().__init__()
        self._args = (docs, tokenizer, data, local_batch, process_index, process_count, repeat)

    def __iter__(self) -> grain.DatasetIterator:
        return _StreamingIterator(*self._args)


class _StreamingIterator(grain.DatasetIterator):
    def __init__(self, docs, tokenizer, data, local_batch, process_index, process_count, repeat):
        super().__init__()
        self._docs, self._tokenizer, self._data, self._repeat = docs, tokenizer, data, repeat
        self._b, self._p, self._n = local_batch, process_index, process_count
        self._consumed = 0
        self._rows = self._row_stream()

    def _row_stream(self) -> Iterator[Batch]:
        while True:
            packed = pack(tokenize(self._docs, self._tokenizer, desc="streaming"), self._data.seq_len,
                          self._data.packing, self._tokenizer.eos_id, self._tokenizer.pad_id)
            any_rows = False
            for tokens, masks in packed:
                any_rows = True
                for i in range(len(tokens)):
                    yield {"tokens": tokens[i], "loss_mask": masks[i]}
            if not any_rows:
                raise UserError("the streamed dataset gave no complete row; check data.name / data.seq_len")
            if not self._repeat:
                return

    def __next__(self) -> Batch:
        global_rows = list(itertools.islice(self._rows, self._b * self._n))
        if not global_rows:
            raise StopIteration  # eval: the split is done
        empty = {k: np.zeros_like(v) for k, v in global_rows[0].items()}
        global_rows += [empty] * (self._b * self._n - len(global_rows))  # eval: fill the last batch, loss_mask 0
        mine = global_rows[self._p * self._b : (self._p + 1) * self._b]
        self._consumed += 1
        return {k: np.stack([r[k] for r in mine]) for k in ("tokens", "loss_mask")}

    def get_state(self) -> dict:
        return {"batches": self._consumed}

    def set_state(self, state: dict) -> None:
        self._rows, self._consumed = self._row_stream(), 0
        for _ in range(state["batches"]):
            next(self)


def make_dataset(
    data: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, batch_size: int, *, seed: int,
    shuffle: bool, repeat: bool, process_index: int = 0, process_count: int = 1,
) -> grain.IterDataset:
    """The batches of `split` for this process (`batch_size` = per-process batch).

    Train (`repeat=True`): endless, reshuffled every epoch. Eval (`repeat=False`): the split once, in order,
    the last batch filled with loss_mask-0 rows.
    """
    if data.source == "hf" and data.streaming:
        docs = sources.load_documents(data, split)
        return _StreamingBatches(docs, tokenizer, data, batch_size, process_index, process_count, repeat)
    rows = load_rows(data, tokenizer, split)
    ds = grain.MapDataset.source(rows)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = _ProcessView(ds, batch_size, process_index, process_count, len(ds) if not repeat else sys.maxsize)
    ds = ds.batch(batch_size, drop_remainder=True).to_iter_dataset()
    if data.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return ds
