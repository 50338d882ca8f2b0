"""Masked-diffusion ancestral sampling (MDLM, Sahoo et al. 2024, sec. 3.3) on the grid t = 1 -> 0.

Each step unmasks every still-masked token with prob (alpha_s - alpha_t) / (1 - alpha_t), drawing it
from p_theta(x_0 | z_t); clean tokens are kept (SUBS carry-over). A final forward fills what is left
with the argmax.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax.diffusion.masked import subs_logits
from dlm_jax.diffusion.schedules import MaskSchedule
from dlm_jax.sampling.loop import SamplerState, init_state, run_scan, sample_categorical

Array = jax.Array


def ancestral_step(
    logits_fn: Callable[[Array, Array], Array], state: SamplerState, *, steps: int, mask_id: int,
    schedule: MaskSchedule, temperature: float,
) -> SamplerState:
    """One reverse step t -> s = t - 1/steps."""
    rng, rng_x0, rng_unmask = jax.random.split(state.rng, 3)
    n = state.tokens.shape[0]
    t = 1.0 - state.step.astype(jnp.float32) / steps
    s = t - 1.0 / steps
    logits = subs_logits(logits_fn(state.tokens, jnp.full((n,), t)), mask_id)
    x0 = sample_categorical(rng_x0, logits, temperature)  # [N, L]
    p_unmask = (schedule.alpha(s) - schedule.alpha(t)) / (1.0 - schedule.alpha(t))
    is_masked = state.tokens == mask_id
    unmask = is_masked & (jax.random.uniform(rng_unmask, state.tokens.shape) < p_unmask)
    tokens = jnp.where(unmask, x0, state.tokens)
    return SamplerState(tokens=tokens, rng=rng, step=state.step + 1, nfe=state.nfe + 1)


def ancestral_sample(
    logits_fn: Callable[[Array, Array], Array], rng: Array, *, num_samples: int, length: int, steps: int,
    mask_id: int, schedule: MaskSchedule, temperature: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """Draws [num_samples, length] tokens with `steps` ancestral steps plus one final argmax pass."""
    state = init_state(jnp.full((num_samples, length), mask_id, jnp.int32), rng)

    def step_fn(s: SamplerState) -> SamplerState:
        return ancestral_step(logits_fn, s, steps=steps, mask_id=mask_id, schedule=schedule, temperature=temperature)

    state = run_scan(step_fn, state, steps)
    final = jnp.argmax(subs_logits(logits_fn(state.tokens, jnp.zeros((num_samples,))), mask_id), axis=-1)
    tokens = jnp.where(state.tokens == mask_id, final, state.tokens)
    return tokens, {"nfe": state.nfe + 1}
