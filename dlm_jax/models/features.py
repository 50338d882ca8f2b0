"""Position and time features of the backbone: rotary tables (Su et al. 2021) and DiT's sinusoidal t features."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def rotary_tables(positions: Array, head_dim: int, base: float) -> tuple[Array, Array]:
    """cos/sin tables [L, head_dim/2] at integer `positions` [L] for rotary embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates pairs (x1, x2) of the two halves of the head dim. x: [B, L, H, D]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as in DiT). t: [B] -> [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
