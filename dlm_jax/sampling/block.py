"""Block-by-block sampling with KV caches: exact for block diffusion, approximate (Fast-dLLM) for full MDLM.

  block          BD3-LM: blocks left to right; inside a block any MDLM rule (the `inner` option) with the block
                 attending to the KV cache of the finished blocks; when a block is done one forward writes its
                 K/V (exact: the block-causal model never lets a clean block see later ones)
  block_nocache  the same draws, each step a full forward with the block-causal mask (tokens identical)
  prefix_cache   Fast-dLLM prefix cache for a full-attention MDLM: once per block a full forward fills the
                 cache (its logits are the block's first step); then the block and everything after it are
                 recomputed against the cached prefix
  dual_cache     Fast-dLLM dual cache: only the block is recomputed, against the cached prefix and the cached
                 (stale until the next block) suffix; the refresh forward is the first step here too
The outer loop is a `lax.scan` over blocks for the exact cache; the approximate caches change their query
shapes per block, so their blocks are unrolled at trace time (one compiled program, a `lax.scan` per block).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dlm_jax.sampling.loop import SamplerState, SampleSpec, init_state
from dlm_jax.sampling.masked import (
    MaskedSampling,
    initial_cache,
    inner_option,
    inner_rule,
    reverse_steps,
    time_grid_option,
    unmask_schedule_option,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    inner: str = inner_option()
    unmask_schedule: str = unmask_schedule_option()
    time_grid: str = time_grid_option()


# decode_fn(tokens [N, Lq], t [N], cache, index) -> (logits [N, Lq, V], cache with the queries' K/V at index)
DecodeFn = Callable[[Array, Array, Any, Array], tuple[Array, Any]]
FullFn = Callable[[Array, Array], Array]  # (tokens [N, L], t [N]) -> logits [N, L, V] (block-causal or full)


def _run_block(ms: MaskedSampling, state: SamplerState, blk: Array, logits_fn: Callable, steps: int) -> SamplerState:
    """Denoises one block [N, Lb] with the inner rule, then fills what is left by argmax."""
    n, lb = blk.shape
    rule = inner_rule(ms.spec)
    inner = init_state(blk, state.rng, initial_cache(rule, n, lb, ms.mask_id + 1))
    inner = inner.replace(step=state.step, nfe=state.nfe)
    inner = getattr(ms, rule)(logits_fn, inner, jnp.ones((n, lb), bool), reverse_steps(rule, steps))
    return ms.final_argmax(logits_fn, inner)


def block_sample(decode_fn: DecodeFn | None, full_fn: FullFn | None, kv_cache: Any, rng: Array, template: Array,
                 spec: SampleSpec, ms: MaskedSampling, block_size: int) -> tuple[Array, dict[str, Array]]:
    """Exact block decoding: with `decode_fn` + `kv_cache` (block) or `full_fn` (block_nocache)."""
    n, length = spec.num_samples, template.shape[0]
    num_blocks = length // block_size
    steps = max(1, spec.steps // num_blocks)
    tokens = jnp.broadcast_to(template.astype(jnp.int32), (n, length))
    state = init_state(tokens, rng, kv_cache)

    def block_body(st: SamplerState, b: Array) -> tuple[SamplerState, None]:
        start = b * block_size
        blk = jax.lax.dynamic_slice_in_dim(st.tokens, start, block_size, axis=1)
        if decode_fn is not None:
            def logits_fn(z: Array, t: Array) -> Array:
                return decode_fn(z, t, st.cache, start)[0]
        else:
            def logits_fn(z: Array, t: Array) -> Array:
                full = full_fn(jax.lax.dynamic_update_slice_in_dim(st.tokens, z, start, axis=1), t)
                return jax.lax.dynamic_slice_in_dim(full, start, block_size, axis=1)
        inner = _run_block(ms, st, blk, logits_fn, steps)
        new = st.replace(tokens=jax.lax.dynamic_update_slice_in_dim(st.tokens, inner.tokens, start, axis=1),
                         rng=inner.rng, step=inner.step, nfe=inner.nfe)
        if decode_fn is not None:  # one forward of the finished block writes its K/V (not needed after the last)
            def commit() -> Any:
                return decode_fn(inner.tokens, jnp.zeros((n,)), st.cache, start)[1]

            is_last = b == num_blocks - 1
            cache = jax.lax.cond(is_last, lambda: st.cache, commit)
            new = new.replace(cache=cache, nfe=new.nfe + (~is_last).astype(jnp.int32))
        return new, None

    state = jax.lax.scan(block_body, state, jnp.arange(num_blocks))[0]
    return state.tokens, {"nfe": state.nfe}


def approx_cache_sample(decode_fn: DecodeFn, init_cache: Callable[[int], Any], rng: Array, template: Array,
                        spec: SampleSpec, ms: MaskedSampling, block_size: int,
                        dual: bool) -> tuple[Array, dict[str, Array]]:
    """Fast-dLLM prefix / dual cache over a full-attention MDLM (approximate: the cache is refreshed once per
    block, so predictions read K/V that are up to one block stale)."""
    n, length = spec.num_samples, template.shape[0]
    num_blocks = length // block_size
    steps = max(1, spec.steps // num_blocks)
    state = init_state(jnp.broadcast_to(template.astype(jnp.int32), (n, length)), rng)
    for b in range(num_blocks):  # trace-time unroll: query shapes differ per block
        start, end = b * block_size, (b + 1) * block_size
        # refresh: one full forward fills the whole cache; its logits are also the block's first step
        refreshed, cache = decode_fn(state.tokens, jnp.ones((n,)), init_cache(length), 0)
        state = state.replace(nfe=state.nfe + 1)
        if dual:  # keys: cached prefix + cached (stale) suffix, plus the block itself
            others = jax.tree.map(lambda c, s=start, e=end: jnp.concatenate([c[:, :, :s], c[:, :, e:]], axis=2), cache)

            def logits_fn(z: Array, t: Array, others=others, start=start) -> Array:
                return decode_fn(z, t, others, jnp.asarray(start, jnp.int32), valid=length - block_size)[0]
            window_end = end
        else:  # queries: the block and the whole suffix, against the cached prefix

            def logits_fn(z: Array, t: Array, cache=cache, start=start) -> Array:
                return decode_fn(z, t, cache, jnp.asarray(start, jnp.int32))[0]
            window_end = length
        window = state.tokens[:, start:window_end]
        active = jnp.broadcast_to(jnp.arange(window_end - start) < block_size, window.shape)
        rule = inner_rule(ms.spec)
        inner = init_state(window, state.rng, initial_cache(rule, n, window.shape[1], ms.mask_id + 1))
        inner = inner.replace(step=state.step, nfe=state.nfe)
        inner = getattr(ms, rule)(logits_fn, inner, active, reverse_steps(rule, steps),
                                  primed=refreshed[:, start:window_end])
        inner = ms.final_argmax(logits_fn, inner, active)
        done = jnp.where(active, inner.tokens, window)
        state = state.replace(tokens=state.tokens.at[:, start:window_end].set(done), rng=inner.rng, step=inner.step,
                              nfe=inner.nfe)
    return state.tokens, {"nfe": state.nfe}
