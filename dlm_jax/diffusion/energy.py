"""EDLM (Xu et al., ICLR 2025; DESIGN.md section 6): a masked diffusion denoiser corrected by a sequence energy,
p_phi(x_0 | x_t) = p_theta(x_0 | x_t) exp(-E(x_0, x_t, t)) / Z(x_t), p_theta a frozen MDLM. Pure functions of arrays.

Energies (low energy = data):
  ar    E = -log p_AR(x_0) + log p_theta(x_0 | x_t)            (the product is the AR posterior given x_t)
  coar  E = -sum_{masked l} log p_AR(x_0^l | x_0^{<l}) + log p_theta(x_0 | x_t)   (self-normalised: Z = 1)
  nce   E = a trained network (models/energy.py), loss -log sigmoid(-E(x+)) - log sigmoid(E(x-))
Every function takes log-probabilities (the reference code passed probabilities to one: bug 2 of DESIGN.md).
Candidates are laid out sample-major, row b * k + j = candidate j of sample b (`expand_candidates`), and regrouped
with the same layout (`group_candidates`): a k-major layout reshaped as [B, k] mixes samples (bug 3).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
ENERGIES = ("ar", "coar", "nce")


def expand_candidates(x: Array, k: int) -> Array:
    """[B, ...] -> [B * k, ...], each row repeated k times in a row (sample-major: row b * k + j is sample b)."""
    return jnp.repeat(x, k, axis=0)


def group_candidates(x: Array, k: int) -> Array:
    """[B * k, ...] in the sample-major layout of `expand_candidates` -> [B, k, ...]."""
    return x.reshape((x.shape[0] // k, k) + x.shape[1:])


def sequence_logprob(token_logprob: Array, where: Array) -> Array:
    """sum_l log p(x^l) over the positions `where` [..., L]: [..., L] -> [...]."""
    return jnp.sum(jnp.where(where, token_logprob, 0.0), axis=-1)


def ar_energy(ar_logprob: Array, denoiser_logprob: Array, masked: Array, carry_over: bool) -> Array:
    """E of the AR energies from per-token log-probabilities [..., L]: log p_AR(x_0^l | x_0^{<l}) and
    log p_theta(x_0^l | x_t); `masked` [..., L] = the [MASK] positions of x_t. ar: every position of the AR term;
    coar (carry_over): masked positions only. -> [...]."""
    ar_term = sequence_logprob(ar_logprob, masked) if carry_over else jnp.sum(ar_logprob, axis=-1)
    return -ar_term + sequence_logprob(denoiser_logprob, masked)


def log_importance_weights(target_logprob: Array, proposal_logprob: Array, energy: Array, tau: float) -> Array:
    """Normalised log-weights [B, k] of candidates drawn from a proposal q for the target p_theta exp(-E / tau):
    log w = log p_theta - E / tau - log q, then log-softmax over k. With q = p_theta this is softmax(-E / tau)."""
    logits = target_logprob - energy / tau - proposal_logprob
    return jax.nn.log_softmax(logits, axis=-1)


def resample(rng: Array, candidates: Array, log_weights: Array) -> Array:
    """One candidate per sample: candidates [B, k, L], log_weights [B, k] -> [B, L] (index ~ Categorical(w))."""
    index = jax.random.categorical(rng, log_weights, axis=-1)  # [B]
    return jnp.take_along_axis(candidates, index[:, None, None], axis=1)[:, 0]


def _log_mean_exp(a: Array, axis: int = -1) -> Array:
    return jax.nn.logsumexp(a, axis=axis) - math.log(a.shape[axis])


def log_partition_estimates(neg_energy: Array) -> tuple[Array, Array]:
    """EDLM Theorem 1 (after Bakhtin et al. 2021) from n >= 2 proposals x_i ~ p_theta(. | x_t), a_i = -E(x_i)
    [..., n]: (lower, upper) estimates of log Z = log E_{p_theta}[exp(-E)].

    lower = T_n = log (1/n) sum_i exp(a_i)  (E[T_n] <= log Z by Jensen);
    upper = (2n - 1) T_n - 2 (n - 1) mean_j T_{n-1}^{(-j)}, T_{n-1}^{(-j)} the leave-one-out estimate without x_j
    (asymptotically E[upper] >= log Z; both converge to log Z as n grows)."""
    n = neg_energy.shape[-1]
    if n < 2:
        raise ValueError(f"the leave-one-out estimate needs n >= 2 proposals, got {n}")
    lower = _log_mean_exp(neg_energy)
    drop = jnp.eye(n, dtype=bool)  # row j: leave x_j out
    loo = jax.nn.logsumexp(jnp.where(drop, -jnp.inf, neg_energy[..., None, :]), axis=-1) - math.log(n - 1)
    upper = (2 * n - 1) * lower - 2 * (n - 1) * loo.mean(axis=-1)
    return lower, upper


def effective_sample_size(log_weights: Array) -> Array:
    """Kish's ESS 1 / sum_i w_i^2 of normalised weights softmax(log_weights [..., n]): n when the weights are equal,
    1 when one proposal carries them all (then log Z estimates from these proposals are unreliable)."""
    return 1.0 / jnp.sum(jax.nn.softmax(log_weights, axis=-1) ** 2, axis=-1)


def nce_terms(energy_pos: Array, energy_neg: Array) -> dict[str, Array]:
    """NCE (binary) loss of positives (real x_0) [B] and negatives (x0_hat ~ p_theta) [B, k]:
    -log sigmoid(-E+) - mean_k log sigmoid(E-), and the separation accuracy (E+ < 0, E- > 0), per batch mean."""
    pos, neg = energy_pos.astype(jnp.float32), energy_neg.astype(jnp.float32)
    loss = jnp.mean(-jax.nn.log_sigmoid(-pos)) + jnp.mean(-jax.nn.log_sigmoid(neg))
    accuracy = 0.5 * (jnp.mean(pos < 0) + jnp.mean(neg > 0))
    return {"loss": loss, "accuracy": accuracy, "energy_pos": pos.mean(), "energy_neg": neg.mean(),
            "ranking_accuracy": jnp.mean(pos[:, None] < neg)}
