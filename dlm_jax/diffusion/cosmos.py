"""Cosmos's math (Meshchaninov et al. 2025, arXiv 2506.21170; DESIGN.md section 7): the autoencoder's augmentations,
the standardisation statistics, and the latent diffusion's training target with self-conditioning.

Augmentations act on disjoint halves of a batch: the first half by token masking (positions dropped from the
compressor's keys w.p. p), the second by Gaussian mixing h' = d h + sqrt(1 - d^2) eps of the latents followed by
latent dropout (elements zeroed w.p. p, the rest scaled by 1 / (1 - p)). Diffusion: z_t = a_t z_0 + b_t eps on the
VP tan-d schedule (`diffusion/gaussian.py`), x0-prediction, unweighted MSE; self-conditioning (Chen et al. 2023):
with probability p the model also reads a stop-gradient x0 estimate made from the same z_t.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
STD_FLOOR = 1e-6  # a channel that never varies is divided by this, not by 0


def first_half(n: int) -> Array:
    """[n] bool: the rows that get token masking (the others get mixing and latent dropout)."""
    return jnp.arange(n) < n // 2


def compressor_keep(rng: Array, loss_mask: Array, rows: Array, p: float) -> Array:
    """[B, L] bool: the positions the compressor attends to: real tokens, minus a random fraction p in `rows`."""
    dropped = rows[:, None] & (jax.random.uniform(rng, loss_mask.shape) < p)
    return (loss_mask > 0) & ~dropped


def gaussian_mix(rng: Array, latents: Array, rows: Array, d: float) -> Array:
    """h' = d h + sqrt(1 - d^2) eps in `rows` [B] (d = 1: unchanged); latents [B, N, D]."""
    noise = jax.random.normal(rng, latents.shape, jnp.float32)
    mixed = d * latents.astype(jnp.float32) + np.sqrt(max(1.0 - d * d, 0.0)) * noise
    return jnp.where(rows[:, None, None], mixed, latents.astype(jnp.float32))


def latent_dropout(rng: Array, latents: Array, rows: Array, p: float) -> Array:
    """Inverted dropout of latent elements w.p. p in `rows` [B]."""
    if p <= 0.0:
        return latents
    kept = jax.random.uniform(rng, latents.shape) >= p
    return jnp.where(rows[:, None, None], jnp.where(kept, latents / (1.0 - p), 0.0), latents)


def moment_sums(x: Array, weight: Array) -> tuple[Array, Array, Array]:
    """(sum w x, sum w x^2, sum w) over the leading axes of weight's rank: x [*W, *F], weight [*W] -> [*F] sums."""
    x = x.astype(jnp.float32)
    w = weight.astype(jnp.float32).reshape(weight.shape + (1,) * (x.ndim - weight.ndim))
    axes = tuple(range(weight.ndim))
    return (w * x).sum(axes), (w * x * x).sum(axes), weight.astype(jnp.float32).sum()


def finish_moments(sums: list[tuple[np.ndarray, np.ndarray, np.ndarray]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 from pooled `moment_sums` of several batches (accumulated in float64)."""
    total, total_sq, count = (sum(np.asarray(s[i], np.float64) for s in sums) for i in range(3))
    if count <= 0:
        raise ValueError(f"no data to fit the {name} statistics")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, STD_FLOOR).astype(np.float32)


def standardize(x: Array, mean: Array, std: Array) -> Array:
    return (x.astype(jnp.float32) - mean) / std


def unstandardize(x: Array, mean: Array, std: Array) -> Array:
    return x.astype(jnp.float32) * std + mean


def self_conditioned_x0(denoiser: Callable[[Array, Array, Array | None], Array], z_t: Array, t: Array, rng: Array,
                        p: float) -> Array:
    """The training prediction x0_hat [B, N, C]: with probability p (one draw per batch) the model also reads its own
    stop-gradient estimate from the same z_t (one extra forward), else zeros (p = 0: one forward, no input)."""
    if p <= 0.0:
        return denoiser(z_t, t, None)

    def estimate() -> Array:
        return jax.lax.stop_gradient(denoiser(z_t, t, jnp.zeros_like(z_t)))

    x0_sc = jax.lax.cond(jax.random.uniform(rng, ()) < p, estimate, lambda: jnp.zeros(z_t.shape, jnp.float32))
    return denoiser(z_t, t, x0_sc)
