"""Masked (absorbing-state) diffusion: MDLM (Sahoo et al. 2024) / MD4 (Shi et al. 2024).

Forward: each token stays with prob alpha_t, else becomes [MASK]. SUBS parameterisation: the model never
predicts [MASK] (its logit is -inf) and clean tokens are carried over. The NELBO is
E_t [ w(t) * sum_{masked l} -log p_theta(x^l | z_t) ] with w = -alpha'_t / (1 - alpha_t) (1/t for linear).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from dlm_jax.diffusion.common import token_nll
from dlm_jax.diffusion.schedules import MaskSchedule, sample_times

Array = jax.Array
LogitsFn = Callable[[Array, Array], Array]  # (z_t [B, L], t [B]) -> logits [B, L, V+1]


def schedule_from_config(section: ml_collections.ConfigDict) -> MaskSchedule:
    """The schedule of a family's config section (`schedule`, `schedule_power`, `schedule_shift` where it has one)."""
    return MaskSchedule(kind=section.schedule, power=section.schedule_power, shift=section.get("schedule_shift", 0.0))


def subs_logits(logits: Array, mask_id: int) -> Array:
    """SUBS: forbid predicting [MASK] by setting its logit to -inf. logits: [..., V+1]."""
    return logits.at[..., mask_id].set(-jnp.inf)


def forward_mask(rng: Array, x0: Array, alpha_t: Array, mask_id: int) -> tuple[Array, Array]:
    """z_t: each token of x0 [B, L] becomes mask_id with prob 1 - alpha_t ([B], or [B, L] per token).

    Returns (z_t, is_masked)."""
    keep = alpha_t[:, None] if alpha_t.ndim == 1 else alpha_t
    is_masked = jax.random.uniform(rng, x0.shape) < (1.0 - keep)
    return jnp.where(is_masked, mask_id, x0), is_masked


def masked_token_nll(logits: Array, x0: Array, is_masked: Array, mask_id: int) -> Array:
    """-log p_theta(x0 | z_t) under SUBS at the masked positions, 0 at clean ones (carry-over): [B, L] nats."""
    return jnp.where(is_masked, token_nll(subs_logits(logits, mask_id), x0), 0.0)


def masked_nll_terms(logits: Array, x0: Array, is_masked: Array, loss_mask: Array, t: Array,
                     schedule: MaskSchedule, num_timesteps: int, mask_id: int) -> dict[str, Array]:
    """NELBO terms of raw logits [B, L, V+1] predicted from z_t: nll_sum (the weighted masked cross-entropy under
    SUBS, nats), num_tokens, mask_rate. Clean tokens cost 0 (carry-over)."""
    if num_timesteps > 0:
        weight = schedule.discrete_weight(t, num_timesteps)
    else:
        weight = schedule.continuous_weight(t)
    per_token = masked_token_nll(logits, x0, is_masked, mask_id) * weight[:, None] * loss_mask
    return {"nll_sum": per_token.sum(), "num_tokens": loss_mask.sum(), "mask_rate": is_masked.mean()}


def nelbo_terms_at(
    logits_fn: LogitsFn, x0: Array, loss_mask: Array, t: Array, rng: Array, schedule: MaskSchedule,
    num_timesteps: int, mask_id: int,
) -> dict[str, Array]:
    """NELBO terms at given times t [B] (`masked_nll_terms` of one masking draw).

    Sums run over the whole batch so callers can pool them across batches and devices.
    """
    z_t, is_masked = forward_mask(rng, x0, schedule.alpha(t), mask_id)
    return masked_nll_terms(logits_fn(z_t, t), x0, is_masked, loss_mask, t, schedule, num_timesteps, mask_id)


def nelbo_terms(
    logits_fn: LogitsFn, x0: Array, loss_mask: Array, rng: Array, section: ml_collections.ConfigDict, mask_id: int
) -> dict[str, Array]:
    """One Monte-Carlo draw of the NELBO with (antithetic) t ~ U[eps, 1] (or the T-step grid); `section` is the
    family's config section (schedule, schedule_power, t_eps, antithetic, num_timesteps, schedule_shift).

    With MD4's shifted schedule (schedule_shift = eps > 0) t ~ U[0, 1] and the NELBO adds the reconstruction term
    at t = 0: a token is still masked there with prob 1 - alpha_0 = eps, bounded by a uniform guess over the
    V = mask_id real tokens, eps log V per token (the prior term at t = 1 is neglected, as in MD4)."""
    rng_t, rng_mask = jax.random.split(rng)
    schedule = schedule_from_config(section)
    t_min = 0.0 if schedule.shift else section.t_eps
    t = sample_times(rng_t, x0.shape[0], t_min, section.antithetic, section.num_timesteps)  # [B]
    terms = nelbo_terms_at(logits_fn, x0, loss_mask, t, rng_mask, schedule, section.num_timesteps, mask_id)
    if schedule.shift:
        recon = (1.0 - schedule.alpha(jnp.zeros(()))) * math.log(mask_id)
        terms["nll_sum"] = terms["nll_sum"] + recon * terms["num_tokens"]
    return terms
