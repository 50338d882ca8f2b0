"""Block diffusion (BD3-LM, Arriola et al. 2025): masked diffusion inside blocks of L', autoregressive across them.

The sequence is cut into blocks of L' tokens; block b gets its own time t_b (antithetic over batch x blocks) and
loss sum_b w(t_b) * sum_{masked l in b} -log p(x^l | z_t^b, x^{<b}). Training runs in one pass over
x_t (+) x_0 (length 2L, both halves at positions 0..L-1) with the `bd3_train` attention mask
[[M_BD, M_OBC], [0, M_BC]]: noisy tokens see their own noisy block and strictly earlier clean blocks, clean
tokens are block-causal among themselves; logits come from the x_t half. The mask rate r = 1 - alpha_t is drawn
uniformly, so the weight is 1/r (the dt/dr Jacobian of -alpha'/(1 - alpha)) whatever the schedule. Clipped
schedules draw r from U[beta, omega] (lower-variance training); the reported NELBO uses U[t_eps, 1].
L' = 1 is an AR model, L' = L is MDLM.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.diffusion.common import token_nll
from dlm_jax.diffusion.masked import forward_mask, subs_logits
from dlm_jax.diffusion.schedules import MaskSchedule, uniform_draws

Array = jax.Array
# (tokens [B, 2L], positions [2L]) -> logits [B, 2L, V+1] under the bd3_train mask
LogitsFn = Callable[[Array, Array], Array]

# BD3-LM's variance-minimizing search (sec. 4.2 and its training scripts): widths omega - beta of 0.5 to 0.9 in
# steps of CLIP_SEARCH_DELTA, each slid over [0, 1] in steps of CLIP_SEARCH_DELTA, plus the full interval (eps, 1)
CLIP_SEARCH_WIDTHS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
CLIP_SEARCH_DELTA = 0.05


def clip_search_grid(t_eps: float, widths: tuple[float, ...] = CLIP_SEARCH_WIDTHS,
                     delta: float = CLIP_SEARCH_DELTA) -> tuple[tuple[float, float], ...]:
    """The (beta, omega) candidates: (t_eps, 1) first, then for every width w and offset o = 0, delta, ..., 1 - w the
    interval (max(o, t_eps), o + w); 64 candidates for the default widths (rounded to 1e-6, no duplicates)."""
    steps = round(1.0 / delta)
    grid = [(t_eps, 1.0)]
    for width in widths:
        span = round(width / delta)
        for offset in range(steps - span + 1):
            candidate = (round(max(offset * delta, t_eps), 6), round(min((offset + span) * delta, 1.0), 6))
            if candidate not in grid:
                grid.append(candidate)
    return tuple(grid)


def block_mask_rates(rng: Array, batch: int, num_blocks: int, beta: float, omega: float,
                     antithetic: bool = True) -> Array:
    """Mask rates [B, num_blocks] in [beta, omega]; antithetic: u_k = (u + k / (B nb)) mod 1 over all B x nb."""
    u = uniform_draws(rng, batch * num_blocks, antithetic)
    return (beta + (omega - beta) * u).reshape(batch, num_blocks)


MAX_RESAMPLES = 64  # bound on BD3-LM's re-draw loop (the config check makes a valid draw possible)


def resample_masks(rng: Array, is_masked: Array, keep_prob: Array, block_size: int, beta: float,
                   omega: float) -> Array:
    """BD3-LM's `resample`: blocks whose realised masked fraction falls outside [beta, omega] are re-drawn with the
    same per-token probabilities until every block is inside (at most MAX_RESAMPLES rounds); blocks already inside
    are kept. is_masked, keep_prob: [B, L] -> [B, L]."""
    batch, length = is_masked.shape

    def outside(masked: Array) -> Array:  # [B, L]: the tokens of blocks whose fraction is out of range
        fraction = masked.reshape(batch, length // block_size, block_size).mean(-1)
        bad = (fraction < beta - 1e-6) | (fraction > omega + 1e-6)
        return jnp.repeat(bad, block_size, axis=1)

    def body(carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        rng, masked, rounds = carry
        rng, rng_draw = jax.random.split(rng)
        fresh = jax.random.uniform(rng_draw, masked.shape) < (1.0 - keep_prob)
        return rng, jnp.where(outside(masked), fresh, masked), rounds + 1

    def cond(carry: tuple[Array, Array, Array]) -> Array:
        return jnp.any(outside(carry[1])) & (carry[2] < MAX_RESAMPLES)

    return jax.lax.while_loop(cond, body, (rng, is_masked, jnp.zeros((), jnp.int32)))[1]


def nelbo_terms_at(logits_fn: LogitsFn, x0: Array, loss_mask: Array, mask_rate: Array, rng: Array,
                   schedule: MaskSchedule, block_size: int, mask_id: int,
                   resample: tuple[float, float] | None = None) -> dict[str, Array]:
    """Block NELBO terms for given per-block mask rates [B, nb]: weighted masked cross-entropy (nats, summed),
    num_tokens, and per_block [B, nb] (each block's loss per loss token, NaN for a block without one: the variance
    search's samples). resample=(beta, omega): re-draw blocks whose realised masked fraction is outside
    [beta, omega] (`resample_masks`)."""
    batch, length = x0.shape
    t = schedule.time_at_mask_rate(mask_rate)  # [B, nb]
    t_tok = jnp.repeat(t, block_size, axis=1)  # [B, L]
    z_t, is_masked = forward_mask(rng, x0, schedule.alpha(t_tok), mask_id)
    if resample is not None:
        is_masked = resample_masks(jax.random.fold_in(rng, 1), is_masked, schedule.alpha(t_tok), block_size,
                                   *resample)
        z_t = jnp.where(is_masked, mask_id, x0)
    positions = jnp.concatenate([jnp.arange(length), jnp.arange(length)])
    logits = logits_fn(jnp.concatenate([z_t, x0], axis=1), positions)[:, :length]  # the x_t half
    nll = token_nll(subs_logits(logits, mask_id), x0)  # [B, L]
    # r ~ U[beta, omega] is drawn directly, so the NELBO integral over t becomes one over r = 1 - alpha_t:
    # (-alpha'_t / (1 - alpha_t)) dt = dr / r. The weight is 1/r for every schedule (the schedule only moves t).
    weight = jnp.repeat(1.0 / mask_rate, block_size, axis=1)
    per_token = jnp.where(is_masked, nll, 0.0) * weight * loss_mask
    block_tokens = loss_mask.reshape(batch, -1, block_size).sum(axis=2)  # [B, nb]
    block_loss = per_token.reshape(batch, -1, block_size).sum(axis=2) / jnp.maximum(block_tokens, 1.0)
    return {"nll_sum": per_token.sum(), "num_tokens": loss_mask.sum(), "mask_rate": is_masked.mean(),
            "per_block": jnp.where(block_tokens > 0, block_loss, jnp.nan)}


def nelbo_terms(logits_fn: LogitsFn, x0: Array, loss_mask: Array, rng: Array, schedule: MaskSchedule,
                block_size: int, mask_id: int, beta: float, omega: float, antithetic: bool = True,
                resample: bool = False) -> dict[str, Array]:
    """One Monte-Carlo draw of the block NELBO with mask rates ~ U[beta, omega] per block (resample: the realised
    masked fraction of every block is forced into [beta, omega] too, as BD3-LM's training.resample)."""
    rng_t, rng_mask = jax.random.split(rng)
    rates = block_mask_rates(rng_t, x0.shape[0], x0.shape[1] // block_size, beta, omega, antithetic)
    return nelbo_terms_at(logits_fn, x0, loss_mask, rates, rng_mask, schedule, block_size, mask_id,
                          (beta, omega) if resample else None)


def best_clip(per_block: dict[tuple[float, float], np.ndarray]) -> tuple[tuple[float, float], dict[str, float]]:
    """The (beta, omega) whose per-block loss estimates (NaN: blocks without loss tokens, left out) have the
    smallest variance (BD3-LM's data-driven clipped schedule), and every candidate's variance."""
    variance = {c: float(np.nanvar(np.asarray(v, np.float64))) for c, v in per_block.items()}
    best = min(variance, key=variance.get)
    return best, {f"{b:g}-{o:g}": v for (b, o), v in variance.items()}
