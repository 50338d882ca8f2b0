"""Gaussian diffusion of a continuous latent, shared by the latent families (CCDD's per-token latent, Cosmos's
compressed latents): the schedules z_t = a_t z_0 + b_t eps, the forward draw, and the reverse steps t -> s given an
estimate z0_hat (DDIM, and the exact Gaussian posterior for DDPM / ancestral sampling).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array
LATENT_SCHEDULES = ("vp_linear", "flow_linear", "vp_tan")


def per_sample(t: Array, ndim: int) -> Array:
    """t [B] (or a scalar) broadcast against [B, ...] arrays of `ndim` dims."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (ndim - t.ndim)) if t.ndim else t


@dataclasses.dataclass(frozen=True)
class LatentSchedule:
    """z_t = a_t z_0 + b_t eps on t in [0, 1] (a_0 = 1, a_1 = 0):
      vp_linear    a^2 = 1 - t, b^2 = t                                   (CCDD)
      flow_linear  a = 1 - t, b = t                                       (rectified flow)
      vp_tan       a = 1 / sqrt(1 + d^2 tan^2(pi t / 2)), b = sqrt(1 - a^2) (Cosmos; SNR = cot^2(pi t / 2) / d^2)
    """

    kind: str = "vp_linear"
    d: float = 5.0  # vp_tan only: the schedule's shift (larger d: noisier at every t)

    def _d_tan(self, t: Array) -> Array:
        return self.d * jnp.abs(jnp.tan(0.5 * math.pi * jnp.clip(t, 0.0, 1.0)))

    def a(self, t: Array) -> Array:
        if self.kind == "vp_tan":
            return jax.lax.rsqrt(1.0 + jnp.square(self._d_tan(t)))
        return jnp.sqrt(1.0 - t) if self.kind == "vp_linear" else 1.0 - t

    def b(self, t: Array) -> Array:
        if self.kind == "vp_tan":  # d tan / sqrt(1 + d^2 tan^2): exact near t = 0, where 1 - a^2 cancels
            x = self._d_tan(t)
            return x * jax.lax.rsqrt(1.0 + jnp.square(x))
        return jnp.sqrt(t) if self.kind == "vp_linear" else t

    def snr(self, t: Array) -> Array:
        """a_t^2 / b_t^2."""
        if self.kind == "vp_tan":
            return 1.0 / jnp.square(self._d_tan(t))
        return (1.0 - t) / t if self.kind == "vp_linear" else ((1.0 - t) / t) ** 2

    def snr_derivative(self, t: Array) -> Array:
        """d SNR / dt (negative): -1/t^2 (vp_linear), -2 (1 - t) / t^3 (flow_linear),
        -pi cos(pi t / 2) / (d^2 sin^3(pi t / 2)) (vp_tan)."""
        if self.kind == "vp_tan":
            half = 0.5 * math.pi * t
            return -math.pi * jnp.cos(half) / (self.d**2 * jnp.sin(half) ** 3)
        return -1.0 / t**2 if self.kind == "vp_linear" else -2.0 * (1.0 - t) / t**3


def noisy_latent(z0: Array, t: Array, noise: Array, schedule: LatentSchedule) -> Array:
    """z_t = a_t z0 + b_t noise; z0, noise [B, ...], t [B]."""
    t = per_sample(t, z0.ndim)
    return schedule.a(t) * z0 + schedule.b(t) * noise


def ddim_step(z_t: Array, z0_hat: Array, t: Array, s: Array, schedule: LatentSchedule) -> Array:
    """Deterministic DDIM t -> s: z_s = a_s z0_hat + (b_s / b_t)(z_t - a_t z0_hat)."""
    t, s = per_sample(t, z_t.ndim), per_sample(s, z_t.ndim)
    return schedule.a(s) * z0_hat + schedule.b(s) / schedule.b(t) * (z_t - schedule.a(t) * z0_hat)


def latent_posterior(z_t: Array, z0_hat: Array, t: Array, s: Array,
                     schedule: LatentSchedule) -> tuple[Array, Array]:
    """(mean, variance) of q(z_s | z_t, z_0 = z0_hat). With a_{t|s} = a_t / a_s, v = b_t^2 - a_{t|s}^2 b_s^2:
    mean = (a_{t|s} b_s^2 / b_t^2) z_t + (a_s v / b_t^2) z0_hat, var = v b_s^2 / b_t^2; for VP (abar = a^2) this is
    mean = a_t/a_s (1 - abar_s)/(1 - abar_t) z_t + (abar_s - abar_t)/(a_s (1 - abar_t)) z0_hat,
    var = (abar_s - abar_t)(1 - abar_s) / (abar_s (1 - abar_t))."""
    t, s = per_sample(t, z_t.ndim), per_sample(s, z_t.ndim)
    a_t, b_t, a_s, b_s = schedule.a(t), schedule.b(t), schedule.a(s), schedule.b(s)
    a_ts = a_t / a_s
    v = b_t**2 - a_ts**2 * b_s**2
    mean = a_ts * b_s**2 / b_t**2 * z_t + a_s * v / b_t**2 * z0_hat
    return mean, v * b_s**2 / b_t**2


def ddpm_step(rng: Array, z_t: Array, z0_hat: Array, t: Array, s: Array, schedule: LatentSchedule) -> Array:
    """Ancestral step: z_s ~ q(z_s | z_t, z_0 = z0_hat) (mean + standard deviation * noise)."""
    mean, var = latent_posterior(z_t, z0_hat, t, s, schedule)
    return mean + jnp.sqrt(jnp.maximum(var, 0.0)) * jax.random.normal(rng, z_t.shape, jnp.float32)
