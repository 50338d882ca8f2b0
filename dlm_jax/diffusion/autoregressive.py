"""Autoregressive next-token model on the same backbone (causal mask): the baseline and the judge.

-log p(x) = sum_l -log p(x^l | x^{<l}); the input is [BOS] + x[:-1] (BOS = the tokenizer's EOS id).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dlm_jax.diffusion.common import token_nll

Array = jax.Array


def prepend_bos(x: Array, bos_id: int) -> Array:
    """[BOS, x_0, ..., x_{L-1}]: x [B, L] -> [B, L + 1]."""
    return jnp.concatenate([jnp.full((x.shape[0], 1), bos_id, x.dtype), x], axis=1)


def shift_right(x: Array, bos_id: int) -> Array:
    """[BOS, x_0, ..., x_{L-2}]: the causal model reads this and predicts x. x: [B, L]."""
    return prepend_bos(x[:, :-1], bos_id)


def token_logprob(logits_fn: Callable[[Array], Array], x: Array, bos_id: int) -> Array:
    """log p(x^l | x^{<l}) per position of x [B, L] (nats): one causal forward on [BOS] + x[:-1]."""
    return -token_nll(logits_fn(shift_right(x, bos_id)), x)


def nll_terms(logits_fn: Callable[[Array], Array], x: Array, loss_mask: Array, bos_id: int) -> dict[str, Array]:
    """Summed next-token negative log-likelihood (nats) and the number of tokens it covers."""
    nll = -token_logprob(logits_fn, x, bos_id)  # [B, L]
    return {"nll_sum": (nll * loss_mask).sum(), "num_tokens": loss_mask.sum()}
