"""Tokenizers: `byte` (UTF-8 bytes), `char` (the text8 alphabet), `hf` (HF tokenizers) and `sentencepiece`.

Every tokenizer has an EOS id (document separator, and the AR model's BOS) and a PAD id inside its
`vocab_size`; families append their own ids (MDLM's [MASK]) after it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from dlm_jax import fileio
from dlm_jax.errors import UserError

TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"


class Tokenizer:
    """Text <-> int32 ids. Subclasses set `vocab_size`, `eos_id`, `pad_id`, `name`, `is_character_level`."""

    name: str
    vocab_size: int  # ids in [0, vocab_size), specials included
    eos_id: int
    pad_id: int
    is_character_level: bool = False  # byte/char: bits per token are bits per character (bpc)

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        """What a prepared dataset records so it is never read with another tokenizer."""
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then EOS = 256 and PAD = 257."""

    name = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257
    is_character_level = True

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")


class CharTokenizer(Tokenizer):
    """text8 characters (space, a-z) -> 0..26, then EOS = 27 and PAD = 28. Text is lower-cased; any other
    character becomes a space (text8's own preprocessing)."""

    name = "char"
    vocab_size = len(TEXT8_ALPHABET) + 2
    eos_id = len(TEXT8_ALPHABET)
    pad_id = len(TEXT8_ALPHABET) + 1
    is_character_level = True

    def __init__(self):
        table = np.zeros(256, np.int32)  # non-alphabet bytes -> space (id 0)
        for i, ch in enumerate(TEXT8_ALPHABET):
            table[ord(ch)] = i
        self._table = table

    def encode(self, text: str) -> np.ndarray:
        raw = np.frombuffer(text.lower().encode("ascii", errors="replace"), np.uint8)
        return self._table[raw]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(TEXT8_ALPHABET[i] for i in np.asarray(ids).tolist() if i < len(TEXT8_ALPHABET))


def _first_present(lookup, candidates: Sequence[str]) -> int | None:
    for token in candidates:
        token_id = lookup(token)
        if token_id is not None and token_id >= 0:
            return int(token_id)
    return None


EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>", "<|im_end|>")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class HFTokenizer(Tokenizer):
    """A HF `tokenizers` tokenizer from a hub name (`gpt2`, `bert-base-uncased`), a directory holding
    `tokenizer.json`, or the file itself. EOS/PAD are the model's own special tokens when it has them
    (GPT-2 <|endoftext|>, BERT [SEP]/[PAD]); missing ones are appended after the vocabulary."""

    is_character_level = False

    def __init__(self, name_or_path: str):
        from tokenizers import Tokenizer as HFTok

        source = fileio.as_path(name_or_path)  # local or gs://
        file = source / "tokenizer.json" if source.is_dir() else source
        if not file.is_file() and (source.exists() or name_or_path.endswith(".json") or fileio.is_cloud(name_or_path)):
            raise UserError(f"data.tokenizer_path={name_or_path!r}: no tokenizer.json there")
        try:
            self._tok = HFTok.from_str(file.read_text()) if file.is_file() else HFTok.from_pretrained(name_or_path)
        except Exception as e:  # noqa: BLE001 -- hub errors (offline, typo) become one line
            raise UserError(
                f"cannot load HF tokenizer {name_or_path!r} ({type(e).__name__}); give a hub name with network access, "
                "or a local directory / tokenizer.json via --config.data.tokenizer_path"
            ) from e
        self.name = f"hf:{name_or_path}"
        base = self._tok.get_vocab_size(with_added_tokens=True)
        lookup = self._tok.token_to_id
        eos, pad = _first_present(lookup, EOS_CANDIDATES), _first_present(lookup, PAD_CANDIDATES)
        self.eos_id = base if eos is None else eos
        self.vocab_size = base + (eos is None)
        self.pad_id = self.vocab_size if pad is None else pad
        self.vocab_size += pad is None

    def token_to_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (e.g. a special token like <|mdm_mask|>), None if it has none."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        base = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [i for i in np.asarray(ids).tolist() if i < base and i not in (self.eos_id, self.pad_id)]
        return self._tok.decode(ids)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file; its eos/pad ids are used when defined, else appended."""

    is_character_level = False

    def __init__(self, path: str):
        import sentencepiece as spm

        model = fileio.as_path(path)  # local or gs://
        if not model.is_file():
            raise UserError(f"sentencepiece model {path!r} not found; set --config.data.tokenizer_path=FILE.model")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model.read_bytes())
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path!r} is not a sentencepiece model ({type(e).__name__})") from e
        self.name = f"sentencepiece:{os.path.basename(path)}"
        base = self._sp.get_piece_size()
        eos, pad = self._sp.eos_id(), self._sp.pad_id()
        self.eos_id = eos if eos >= 0 else base
        self.vocab_size = base + (eos < 0)
        self.pad_id = pad if pad >= 0 else self.vocab_size
        self.vocab_size += pad < 0

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        base = self._sp.get_piece_size()
        ids = [i for i in np.asarray(ids).tolist() if i < base and i not in (self.eos_id, self.pad_id)]
        return self._sp.decode(ids)


def get_tokenizer(data: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer named by `data.tokenizer` (+ `data.tokenizer_path`)."""
    if data.tokenizer == "byte":
        return ByteTokenizer()
    if data.tokenizer == "char":
        return CharTokenizer()
    if data.tokenizer == "hf":
        return HFTokenizer(data.tokenizer_path)
    if data.tokenizer == "sentencepiece":
        return SentencePieceTokenizer(data.tokenizer_path)
    raise UserError(f"unknown data.tokenizer {data.tokenizer!r}")
