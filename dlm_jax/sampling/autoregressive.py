"""Autoregressive decoding, the baseline every speed claim is compared with; both decoders are one `lax.scan`.

  ar          KV cache: one prefill forward over [BOS] + prompt, then one single-token forward per new token
              that attends to the cache (kernels/attention.py:cached_attention)
  ar_nocache  the full causal forward over a fixed-shape buffer at every step (shows what the cache saves)
Both consume the rng identically, so they give the same tokens (tested). Greedy at temperature 0; nucleus top-p.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dlm_jax.errors import UserError
from dlm_jax.sampling.loop import SamplerState, SampleSpec, init_state, run_scan, sample_categorical

Array = jax.Array
SAMPLERS = ("ar", "ar_nocache")


def check_prompt(template: Array) -> int:
    """The prompt length of a template ([P known ids] then -1s): AR can only continue a prefix."""
    known = [int(x) >= 0 for x in template]
    num_prompt = known.index(False) if False in known else len(known)
    if any(known[num_prompt:]):
        raise UserError("an AR model can only continue a prompt; infilling needs a diffusion model")
    if num_prompt == len(known):
        raise UserError(f"the prompt already fills all {len(known)} tokens; raise --length")
    return num_prompt


def sample_nocache(logits_fn: Callable[[Array], Array], rng: Array, template: Array, spec: SampleSpec,
                   bos_id: int, num_prompt: int) -> tuple[Array, dict[str, Array]]:
    """x^l ~ p(. | BOS, x^{<l}); every step recomputes the causal forward over the whole [N, L] buffer."""
    n, length = spec.num_samples, template.shape[0]
    prefix = jnp.where(template >= 0, template, bos_id).astype(jnp.int32)
    buffer = jnp.broadcast_to(jnp.concatenate([jnp.array([bos_id], jnp.int32), prefix]), (n, length + 1))

    def step(s: SamplerState, i: Array) -> SamplerState:
        pos = num_prompt + i  # the position being generated
        rng, rng_step = jax.random.split(s.rng)
        logits = jax.lax.dynamic_index_in_dim(logits_fn(s.tokens[:, :-1]), pos, axis=1, keepdims=False)
        token = sample_categorical(rng_step, logits, spec.temperature, spec.top_p)
        tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, token[:, None], pos + 1, axis=1)
        return s.replace(tokens=tokens, rng=rng, step=s.step + 1, nfe=s.nfe + 1)

    state = run_scan(step, init_state(buffer, rng), length - num_prompt)
    return state.tokens[:, 1:], {"nfe": state.nfe}


def sample_cached(decode_fn: Callable[[Array, Any, Array], tuple[Array, Any]], cache: Any, rng: Array,
                  template: Array, spec: SampleSpec, bos_id: int, num_prompt: int) -> tuple[Array, dict[str, Array]]:
    """Prefill [BOS] + prompt into the KV cache in one forward, then decode one token per forward.

    decode_fn(tokens [N, Lb], cache, index) -> (logits [N, Lb, V], cache with the block's K/V at index).
    """
    n, length = spec.num_samples, template.shape[0]
    prompt = jnp.broadcast_to(template[:num_prompt].astype(jnp.int32), (n, num_prompt))
    prefill = jnp.concatenate([jnp.full((n, 1), bos_id, jnp.int32), prompt], axis=1)  # [N, P + 1]
    logits, cache = decode_fn(prefill, cache, 0)  # index 0: the empty cache is not read
    rng, rng_step = jax.random.split(rng)
    first = sample_categorical(rng_step, logits[:, -1], spec.temperature, spec.top_p)
    out = jnp.concatenate([prompt, first[:, None], jnp.zeros((n, length - num_prompt - 1), jnp.int32)], axis=1)
    state = init_state(out, rng, cache).replace(nfe=jnp.ones((), jnp.int32))

    def step(s: SamplerState, i: Array) -> SamplerState:
        pos = num_prompt + 1 + i  # the position being generated; its input token sits at pos - 1
        rng, rng_step = jax.random.split(s.rng)
        last = jax.lax.dynamic_slice_in_dim(s.tokens, pos - 1, 1, axis=1)
        logits, cache = decode_fn(last, s.cache, pos)  # input position pos (BOS shifts everything by one)
        token = sample_categorical(rng_step, logits[:, 0], spec.temperature, spec.top_p)
        tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, token[:, None], pos, axis=1)
        return s.replace(tokens=tokens, rng=rng, step=s.step + 1, nfe=s.nfe + 1, cache=cache)

    state = run_scan(step, state, length - num_prompt - 1)
    return state.tokens, {"nfe": state.nfe}
