"""Templates for conditional sampling: which tokens are given (a prompt, infill context) and which are generated.

A template is int32 [L]: known token ids, and -1 where a token is to be generated. Infill text marks the
generated spans with `[MASK]` (one token) or `[MASK*N]` (N tokens), e.g. "def add(a, b):[MASK*24]\n".
"""

from __future__ import annotations

import re

import numpy as np

from dlm_jax.data.tokenizers import Tokenizer
from dlm_jax.errors import UserError

_PLACEHOLDER = re.compile(r"\[MASK(?:\*(\d+))?\]")


def build_template(tokenizer: Tokenizer, length: int | None, prompt: str | None = None,
                   infill: str | None = None) -> np.ndarray:
    """The template for `--prompt` (kept prefix, then `length` total) or `--infill` (spans to fill; padded with
    generated tokens up to `length` when that is longer). Neither: `length` generated tokens."""
    if prompt is not None and infill is not None:
        raise UserError("give --prompt or --infill, not both (a prompt is an infill template ending in [MASK*N])")
    parts: list[np.ndarray] = []
    if infill is not None:
        pos = 0
        for match in _PLACEHOLDER.finditer(infill):
            parts.append(tokenizer.encode(infill[pos : match.start()]))
            parts.append(np.full(int(match.group(1) or 1), -1, np.int32))
            pos = match.end()
        parts.append(tokenizer.encode(infill[pos:]))
        if not any((p < 0).any() for p in parts if len(p)):
            raise UserError("--infill has no [MASK] or [MASK*N] span to fill")
    elif prompt is not None:
        parts.append(tokenizer.encode(prompt))
    template = np.concatenate([p.astype(np.int32) for p in parts]) if parts else np.zeros((0,), np.int32)
    if length is None:
        length = len(template) if infill is not None else 0
    if length < 1:
        raise UserError(f"--length must be >= 1, got {length}")
    if len(template) > length or (prompt is not None and len(template) == length):
        raise UserError(f"the {'prompt' if prompt is not None else 'infill template'} has {len(template)} tokens; "
                        f"--length={length} leaves nothing to generate (raise --length)")
    return np.concatenate([template, np.full(length - len(template), -1, np.int32)])
