"""Pieces every token loss shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_nll(logits: Array, targets: Array) -> Array:
    """-log softmax(logits)[target] per position: logits [..., V], targets [...] int -> [...] (nats)."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
