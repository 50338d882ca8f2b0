"""Shared test helpers: tiny configs on a small text corpus built in tmp."""

import os

import ml_collections

from dlm_jax import config as config_lib
from dlm_jax import families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")


def small_corpus(tmp_path, num_chars: int = 60_000) -> str:
    """The first `num_chars` characters of tinyshakespeare, as a text file in tmp."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read(num_chars)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def tiny_config(corpus: str, family: str = "mdlm", overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """A 2-layer, 32-wide model on `corpus` with every step logged."""
    base = [
        f"--config.model.family={family}", "--config.model.num_layers=2", "--config.model.d_model=32",
        "--config.model.num_heads=2", "--config.model.mlp_dim=64", "--config.data.source=text_files",
        f"--config.data.path={corpus}", "--config.data.seq_len=32", "--config.train.batch_size=8",
        "--config.train.num_steps=6", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
        "--config.train.eval_every=0", "--config.train.warmup_steps=2", "--config.eval.batch_size=8",
        "--config.eval.num_batches=2", "--config.mesh.data=-1",
    ]
    config = config_lib.apply_overrides(families.base_config(), base + list(overrides))
    families.validate(config)
    return config


class StubTokenizer:
    """What a family reads of a tokenizer (vocabulary size, EOS id), for unit tests of families on toy vocabularies."""

    def __init__(self, vocab_size: int, eos_id: int = 0):
        self.vocab_size, self.eos_id = vocab_size, eos_id
