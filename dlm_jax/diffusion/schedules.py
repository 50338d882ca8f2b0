"""Masking schedules alpha_t (probability a token is still clean at time t) and diffusion-time draws.

MDLM (Sahoo et al. 2024) and MD4 (Shi et al. 2024): linear alpha_t = 1 - t, cosine
alpha_t = 1 - cos(pi/2 (1 - t)), poly-k alpha_t = 1 - t^k; all go from alpha_0 = 1 to alpha_1 = 0.
MD4's eps-shifted variant (`shift` = eps > 0): alpha_t = (1 - 2 eps) alpha_t + eps, from 1 - eps to eps, so the
NELBO weight stays finite at t = 0 and t can be drawn from the whole [0, 1].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    kind: str = "linear"  # linear | cosine | poly
    power: float = 2.0  # k of poly
    shift: float = 0.0  # MD4's eps: alpha_t = (1 - 2 eps) alpha_t + eps (0: the plain schedule)

    def alpha(self, t: Array) -> Array:
        """alpha_t: the keep probability at time t in [0, 1]."""
        return (1.0 - 2.0 * self.shift) * self._base_alpha(t) + self.shift

    def _base_alpha(self, t: Array) -> Array:
        if self.kind == "linear":
            return 1.0 - t
        if self.kind == "cosine":
            return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))
        if self.kind == "poly":
            return 1.0 - t**self.power
        raise ValueError(f"unknown mask schedule {self.kind!r}")

    def alpha_derivative(self, t: Array) -> Array:
        """d alpha_t / dt (negative)."""
        return (1.0 - 2.0 * self.shift) * self._base_alpha_derivative(t)

    def _base_alpha_derivative(self, t: Array) -> Array:
        if self.kind == "linear":
            return -jnp.ones_like(t)
        if self.kind == "cosine":
            return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))
        if self.kind == "poly":
            return -self.power * t ** (self.power - 1.0)
        raise ValueError(f"unknown mask schedule {self.kind!r}")

    def time_at_mask_rate(self, mask_rate: Array) -> Array:
        """The inverse of t -> 1 - alpha_t: the time at which a token is masked with prob `mask_rate` (clipped to
        the schedule's range [shift, 1 - shift])."""
        if self.shift:
            mask_rate = jnp.clip((mask_rate - self.shift) / (1.0 - 2.0 * self.shift), 0.0, 1.0)
        if self.kind == "linear":
            return mask_rate
        if self.kind == "cosine":  # 1 - alpha = cos(pi/2 (1 - t))
            return 1.0 - jnp.arccos(jnp.clip(mask_rate, 0.0, 1.0)) / (0.5 * math.pi)
        if self.kind == "poly":
            return mask_rate ** (1.0 / self.power)
        raise ValueError(f"unknown mask schedule {self.kind!r}")

    def continuous_weight(self, t: Array) -> Array:
        """NELBO weight -alpha'_t / (1 - alpha_t) of the masked-token cross-entropy (1/t for linear)."""
        return -self.alpha_derivative(t) / (1.0 - self.alpha(t))

    def discrete_weight(self, t: Array, num_timesteps: int) -> Array:
        """T-step NELBO weight T (alpha_s - alpha_t) / (1 - alpha_t), s = t - 1/T (MD4 eq. 6)."""
        s = t - 1.0 / num_timesteps
        return num_timesteps * (self.alpha(s) - self.alpha(t)) / (1.0 - self.alpha(t))


def uniform_draws(rng: Array, n: int, antithetic: bool = True) -> Array:
    """n draws in [0, 1). Antithetic: u_i = (u + i/n) mod 1 with one shared uniform u (low variance); else iid."""
    if antithetic:
        return jnp.mod(jax.random.uniform(rng, ()) + jnp.arange(n, dtype=jnp.float32) / n, 1.0)
    return jax.random.uniform(rng, (n,))


def sample_times(rng: Array, n: int, eps: float, antithetic: bool = True, num_timesteps: int = 0) -> Array:
    """n diffusion times in [eps, 1] from `uniform_draws`.

    With num_timesteps = T > 0 the times are snapped to the grid {1/T, ..., 1} (discrete-time NELBO).
    """
    t = uniform_draws(rng, n, antithetic)
    if num_timesteps > 0:
        return (jnp.floor(t * num_timesteps) + 1.0) / num_timesteps
    return eps + (1.0 - eps) * t
