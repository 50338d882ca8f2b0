"""Autoregressive sampling as one `lax.scan` over positions (full recompute per token; no KV cache yet)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax.sampling.loop import SamplerState, init_state, run_scan, sample_categorical

Array = jax.Array


def ar_sample(
    logits_fn: Callable[[Array], Array], rng: Array, *, num_samples: int, length: int, bos_id: int,
    temperature: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """x^l ~ p(. | BOS, x^{<l}) for l = 0..length-1; the causal mask lets one fixed-shape buffer serve all steps."""
    buffer = jnp.full((num_samples, length + 1), bos_id, jnp.int32)  # [N, L+1]: BOS then the sample

    def step_fn(s: SamplerState) -> SamplerState:
        rng, rng_step = jax.random.split(s.rng)
        logits = logits_fn(s.tokens[:, :-1])  # [N, L, V]; position `step` only sees the prefix
        next_logits = jax.lax.dynamic_index_in_dim(logits, s.step, axis=1, keepdims=False)
        token = sample_categorical(rng_step, next_logits, temperature)
        tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, token[:, None], s.step + 1, axis=1)
        return SamplerState(tokens=tokens, rng=rng, step=s.step + 1, nfe=s.nfe + 1)

    state = run_scan(step_fn, init_state(buffer, rng), length)
    return state.tokens[:, 1:], {"nfe": state.nfe}
