"""The skeleton every sampler shares: a `SamplerState` carried through one jitted `lax.scan`."""

from __future__ import annotations

from typing import Callable

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class SamplerState:
    tokens: Array  # [N, L] int32 current sequence (diffusion: partially masked; AR: prefix written so far)
    rng: Array  # PRNG key, split once per step
    step: Array  # int32 scalar
    nfe: Array  # int32 scalar: number of network forward passes so far


def init_state(tokens: Array, rng: Array) -> SamplerState:
    return SamplerState(tokens=tokens, rng=rng, step=jnp.zeros((), jnp.int32), nfe=jnp.zeros((), jnp.int32))


def run_scan(step_fn: Callable[[SamplerState], SamplerState], state: SamplerState, num_steps: int) -> SamplerState:
    """Applies `step_fn` num_steps times inside one `lax.scan` (no Python loop per step)."""
    return jax.lax.scan(lambda s, _: (step_fn(s), None), state, None, length=num_steps)[0]


def sample_categorical(rng: Array, logits: Array, temperature: float = 1.0) -> Array:
    """Gumbel-max draw from softmax(logits / temperature) in float32 (low precision would truncate the tail).

    temperature 0 means argmax. logits: [..., V] -> ids [...].
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
    return jnp.argmax(logits / temperature + gumbel, axis=-1)
