"""Sample diversity: per-sample unigram entropy of token ids, in bits, averaged (DESIGN.md section 9)."""

from __future__ import annotations

import numpy as np


def unigram_entropy_bits(tokens: np.ndarray) -> float:
    """Mean over samples of H(unigram histogram of the sample's ids), in bits. tokens: [N, L]."""
    entropies = []
    for row in np.asarray(tokens):
        _, counts = np.unique(row, return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(entropies))
