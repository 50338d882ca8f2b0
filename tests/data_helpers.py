"""Shared pieces of the data-package tests (test_tokenizers, test_sources, test_data): tiny data configs on a
6000-character slice of tinyshakespeare, and one-line error checks. Fixtures (corpus, offline) are in conftest."""

import json

import numpy as np
import pytest

from dlm_jax import config as config_lib
from dlm_jax import families
from dlm_jax.errors import UserError
from tests.helpers import SHAKESPEARE

SEQ_LEN = 32
CORPUS_CHARS = 6000  # val_fraction 0.1: train 5400 chars -> 168 rows of 32, val 600 chars -> 18 rows
TRAIN_ROWS, VAL_ROWS = (5400 + 1) // SEQ_LEN, (600 + 1) // SEQ_LEN


def data_config(*overrides: str):
    """`config.data` of base_config() with `--config.data.<override>` applied."""
    return config_lib.apply_overrides(families.base_config(), [f"--config.data.{o}" for o in overrides]).data


def text_config(path, *overrides: str):
    return data_config("source=text_files", f"path={path}", f"seq_len={SEQ_LEN}", "val_fraction=0.1", *overrides)


def user_error(match: str):
    return pytest.raises(UserError, match=match)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def texts(docs) -> list[str]:
    return [docs[i] for i in range(len(docs))]


def collect(dataset, num_batches=None) -> list[dict]:
    out = []
    for batch in dataset:
        out.append(batch)
        if num_batches is not None and len(out) == num_batches:
            break
    return out


def stack(batches, key="tokens") -> np.ndarray:
    return np.concatenate([b[key] for b in batches])


def sorted_rows(tokens: np.ndarray) -> list[tuple]:
    return sorted(tuple(r) for r in tokens.tolist())


def write_jsonl(path, docs, key="text"):
    """An HF-style jsonl file: one {key: doc, "other": 1} object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc, "other": 1}) + "\n")


def train_hf_tokenizer(path, special_tokens):
    """A byte-level BPE (vocab <= 300) trained on a few phrases, saved to `path`; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["to be or not to be, that is the question", "héllo wörld"] * 20, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def train_sentencepiece(tmp):
    """Two BPE sentencepiece models (vocab 64) on 8000 characters of tinyshakespeare, in `tmp`: plain.model (no
    pad) and padded.model (unk 0, bos 1, eos 2, pad 3); returns `tmp`."""
    import sentencepiece as spm

    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read(8000)
    (tmp / "train.txt").write_text(text, encoding="utf-8")
    common = dict(input=str(tmp / "train.txt"), vocab_size=64, model_type="bpe", character_coverage=1.0,
                  minloglevel=2)
    spm.SentencePieceTrainer.train(model_prefix=str(tmp / "plain"), **common)
    spm.SentencePieceTrainer.train(model_prefix=str(tmp / "padded"), pad_id=3, unk_id=0, bos_id=1, eos_id=2,
                                   **common)
    return tmp
