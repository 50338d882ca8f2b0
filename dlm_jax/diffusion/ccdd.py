"""CCDD's continuous half (Zhou et al. 2025, arXiv 2510.03206; DESIGN.md section 5): the latent's Gaussian process,
its training loss, its reverse steps and the terms of a valid bound on -log p(x) for the joint model.

Forward: z_t = a_t z_0 + b_t eps on the same t as the masked tokens; `vp_linear` a = sqrt(1 - t), b = sqrt(t),
`flow_linear` a = 1 - t, b = t. z_0 = standardised per-token features of the clean text from a frozen encoder.
Reverse t -> s (s < t), given z0_hat: DDIM z_s = a_s z0_hat + (b_s / b_t)(z_t - a_t z0_hat), or the exact
Gaussian posterior q(z_s | z_t, z_0 = z0_hat) (`latent_posterior`). The bound (docs/ccdd.md): token NELBO given
the latent path + reconstruction at t_eps + (1/2) int_eps^1 -SNR'(t) E||z0_hat - z_0||^2 dt + KL(q(z_1|z_0) || N(0, I)).
The Gaussian process itself (schedules, forward draw, DDIM / posterior steps) is diffusion/gaussian.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dlm_jax.diffusion.gaussian import LatentSchedule, noisy_latent
from dlm_jax.diffusion.masked import forward_mask, masked_token_nll
from dlm_jax.diffusion.schedules import MaskSchedule, sample_times, uniform_draws

Array = jax.Array
LATENT_SCHEDULES = ("vp_linear", "flow_linear")  # of diffusion/gaussian.py:LatentSchedule
LATENT_WEIGHTINGS = ("ddpm_x", "inv_snr")
PROJECTIONS = ("slice", "random")
WEIGHT_CAP = 10.0  # the training weights and the per-token MSE are clipped here (as in the paper)


def standardize(h: Array, eps: float = 1e-6) -> Array:
    """(h - mean) / sqrt(var + eps) over the last axis (per token, over channels)."""
    h = h.astype(jnp.float32)
    mean = h.mean(axis=-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(((h - mean) ** 2).mean(axis=-1, keepdims=True) + eps)


def latent_features(hidden: Array, dim: int, projection: str) -> Array:
    """z_0 from encoder states [B, L, D]: the first `dim` channels (`slice`) or a fixed Gaussian projection
    D -> dim (`random`, the same matrix every call: PRNGKey(0), scaled by 1/sqrt(D)), standardised per token."""
    hidden = hidden.astype(jnp.float32)
    if projection == "slice":
        features = hidden[..., :dim]
    else:
        width = hidden.shape[-1]
        matrix = jax.random.normal(jax.random.PRNGKey(0), (width, dim), jnp.float32) / math.sqrt(width)
        features = hidden @ matrix
    return standardize(features)


def training_weight(t: Array, weighting: str) -> Array:
    """w(t) of the latent MSE: min(1 / (1 - t), 10) (`ddpm_x`) or min(t / (1 - t), 10) (`inv_snr`)."""
    numerator = 1.0 if weighting == "ddpm_x" else t
    return jnp.minimum(numerator / jnp.maximum(1.0 - t, 1e-12), WEIGHT_CAP)


def latent_loss_terms(z0_hat: Array, z0: Array, t: Array, weighting: str, loss_mask: Array) -> dict[str, Array]:
    """{"latent_sum": sum over tokens of w(t) min(mean_c (z0_hat - z0)^2, 10), "latent_mse_sum": the same
    unweighted and unclipped}; z [B, L, C], t [B], loss_mask [B, L]."""
    mse = jnp.mean(jnp.square(z0_hat.astype(jnp.float32) - z0), axis=-1)  # [B, L]
    weighted = training_weight(t, weighting)[:, None] * jnp.minimum(mse, WEIGHT_CAP)
    return {"latent_sum": (weighted * loss_mask).sum(), "latent_mse_sum": (mse * loss_mask).sum()}


def guided_logits(cond: Array, uncond: Array, weight: float) -> Array:
    """Classifier-free guidance on the latent: w f(x_t, z_t) + (1 - w) f(x_t, 0) (raw logits, before SUBS)."""
    return weight * cond + (1.0 - weight) * uncond


# -- the valid bound on -log p(x) (docs/ccdd.md) ---------------------------------------------------------------


def log_uniform_times(rng: Array, n: int, eps: float, antithetic: bool = True) -> tuple[Array, Array]:
    """(t [n], importance weight [n]) for t with density 1 / (t ln(1/eps)) on [eps, 1]: t = eps^(1 - u), weight
    = t ln(1/eps), so E[weight g(t)] = int_eps^1 g(t) dt. Suits integrands ~ 1/t (the latent term near t = 0)."""
    u = uniform_draws(rng, n, antithetic)
    t = eps ** (1.0 - u)
    return t, t * math.log(1.0 / eps)


def latent_diffusion_term(z0_hat: Array, z0: Array, t: Array, schedule: LatentSchedule) -> Array:
    """Per token [B, L] integrand of the latent bound at t [B]: (1/2) (-SNR'(t)) sum_c (z0_hat - z0)^2 (nats)."""
    sq = jnp.sum(jnp.square(z0_hat.astype(jnp.float32) - z0), axis=-1)
    return 0.5 * -schedule.snr_derivative(jnp.asarray(t, jnp.float32))[..., None] * sq


def latent_prior_kl(z0: Array, schedule: LatentSchedule) -> Array:
    """KL(q(z_1 | z_0) || N(0, I)) per token [B, L]: (1/2) sum_c (a_1^2 z0^2 + b_1^2 - 1 - log b_1^2) (0 for both
    schedules here: a_1 = 0, b_1 = 1)."""
    a1, b1 = schedule.a(jnp.float32(1.0)), schedule.b(jnp.float32(1.0))
    return 0.5 * jnp.sum(a1**2 * jnp.square(z0) + b1**2 - 1.0 - jnp.log(b1**2), axis=-1)


def bound_terms(joint_fn: Callable[[Array, Array, Array], tuple[Array, Array]], x0: Array, z0: Array,
                loss_mask: Array, rng: Array, mask_schedule: MaskSchedule, latent_schedule: LatentSchedule,
                t_eps: float, mask_id: int, antithetic: bool = True) -> dict[str, Array]:
    """One Monte-Carlo draw of the valid bound on -log p(x), per row [B] in nats (docs/ccdd.md), from
    joint_fn(x_t [B, L], z_t [B, L, C], t [B]) -> (raw logits [B, L, V+1], z0_hat [B, L, C]) and z0 = z_0(x0):
      tokens_given_latent  MDLM's token term with the model also reading z_t, t ~ U[eps, 1] (the paper's "ppl")
      recon                -log p(x | x_eps, z_eps) for the tokens still masked at t = eps
      latent               int_eps^1 (1/2)(-SNR'(t)) ||z0_hat - z_0||^2 dt, t log-uniform (importance-weighted)
      prior                KL(q(z_1 | z_0) || N(0, I))
    Three forwards: one per time draw (x_t and z_t drawn at the same t each time)."""
    n = x0.shape[0]
    rng_t, rng_lt, *rngs = jax.random.split(rng, 8)

    def state(t: Array, rng_mask: Array, rng_noise: Array) -> tuple[Array, Array, Array]:
        x_t, is_masked = forward_mask(rng_mask, x0, mask_schedule.alpha(t), mask_id)
        z_t = noisy_latent(z0, t, jax.random.normal(rng_noise, z0.shape), latent_schedule)
        return x_t, is_masked, z_t

    def row(x: Array) -> Array:
        return (x * loss_mask).sum(axis=1)

    t = sample_times(rng_t, n, t_eps, antithetic)
    x_t, is_masked, z_t = state(t, rngs[0], rngs[1])
    logits, _ = joint_fn(x_t, z_t, t)
    weight = mask_schedule.continuous_weight(t)[:, None]
    tokens_given_latent = row(masked_token_nll(logits, x0, is_masked, mask_id) * weight)

    eps = jnp.full((n,), t_eps, jnp.float32)
    x_t, is_masked, z_t = state(eps, rngs[2], rngs[3])
    logits, _ = joint_fn(x_t, z_t, eps)
    recon = row(masked_token_nll(logits, x0, is_masked, mask_id))

    t_lat, importance = log_uniform_times(rng_lt, n, t_eps, antithetic)
    x_t, _, z_t = state(t_lat, rngs[4], rngs[5])
    _, z0_hat = joint_fn(x_t, z_t, t_lat)
    latent = importance * row(latent_diffusion_term(z0_hat, z0, t_lat, latent_schedule))
    return {"tokens_given_latent": tokens_given_latent, "recon": recon, "latent": latent,
            "prior": row(latent_prior_kl(z0, latent_schedule))}
