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
  dkv_cache      dKV-Cache-Decode (Ma et al. 2025), per block: a token's K/V is cached from the first forward that
                 sees its block decoded (the next block's first step, whose queries start one block early) and
                 reused until a full refresh every `refresh_every` blocks; [MASK]s are never cached. Cheaper than
                 prefix_cache (no full forward per block), staler (refresh_every=1 is prefix_cache exactly)
The outer loop is a `lax.scan` over blocks for the exact cache (a `lax.while_loop` when a stop rule is on: it
ends once every sample stopped); the approximate caches change their query shapes per block, so their blocks are
unrolled at trace time (one compiled program, a `lax.scan` per block).

Variable length (BD3-LM, `block` / `block_nocache` options): `stop_at_eos` ends a sample at its first generated EOS;
`entropy_stop` > 0 ends it when the unigram entropy (nats) of its last ENTROPY_WINDOW tokens falls below that
value (BD3-LM uses 4, on GPT-2 tokens) and drops that window; checked only past ENTROPY_WINDOW tokens. A stopped
sample's later positions are EOS (the other samples of the batch go on); `lengths` [N] in the stats says where each
sample ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dlm_jax.sampling.loop import SamplerState, SampleSpec, init_state, option
from dlm_jax.sampling.masked import (
    MaskedSampling,
    SemiAROptions,
    initial_cache,
    inner_option,
    inner_rule,
    reverse_steps,
    time_grid_option,
    unmask_schedule_option,
    window_option,
)
from dlm_jax.sampling.parallel import ParallelOptions

Array = jax.Array


ENTROPY_WINDOW = 256  # tokens whose unigram entropy the entropy stop rule checks (BD3-LM)


@dataclasses.dataclass(frozen=True)
class BlockFields:
    inner: str = inner_option()
    unmask_schedule: str = unmask_schedule_option()
    time_grid: str = time_grid_option()
    stop_at_eos: bool = option(False, "variable length: a sample ends at its first generated EOS (the rest is EOS)")
    entropy_stop: float = option(0.0, f"end a sample when the unigram entropy (nats) of its last {ENTROPY_WINDOW} "
                                      "tokens falls below this, dropping them (BD3-LM: 4); 0: off")
    window: int = window_option()  # block_nocache only: the exact cache keeps absolute positions


@dataclasses.dataclass(frozen=True)
class BlockOptions(ParallelOptions, BlockFields):
    """The block samplers' own options, then the parallel rules' (the later base's fields come first)."""


@dataclasses.dataclass(frozen=True)
class DelayedCacheFields:
    refresh_every: int = option(0, "a full forward refreshes every cached K/V once per this many blocks (0: never "
                                   "after the first; 1: Fast-dLLM's prefix cache)")


@dataclasses.dataclass(frozen=True)
class DelayedCacheOptions(SemiAROptions, DelayedCacheFields):
    """dkv_cache: its own option, then semi_ar's and the parallel rules'."""


def window_entropy(tokens: Array, end: Array, window: int) -> Array:
    """Unigram entropy in nats of tokens[:, end - window : end] ([N, L] -> [N]): -(1/W) sum_i log(c_i / W), c_i the
    count of token i's value in the window (each distinct value v, seen c_v times, contributes -(c_v/W) log(c_v/W))."""
    seg = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(end - window, 0), window, axis=1)  # [N, W]
    counts = (seg[:, :, None] == seg[:, None, :]).sum(axis=-1)  # [N, W]
    return -jnp.mean(jnp.log(counts / window), axis=1)


def stop_lengths(tokens: Array, generated: Array, start: Array, block_size: int, eos_id: int, stop_at_eos: bool,
                 entropy_stop: float) -> Array:
    """Where each sample stops after the block at `start` ([N]; L = does not stop): just after its first generated
    EOS in the block, or, once more than ENTROPY_WINDOW tokens are done and the entropy of the last ENTROPY_WINDOW
    is below `entropy_stop`, before them (samples of at most ENTROPY_WINDOW tokens are never checked)."""
    n, length = tokens.shape
    end = start + block_size
    stop = jnp.full((n,), length, jnp.int32)
    if stop_at_eos:
        blk = jax.lax.dynamic_slice_in_dim(tokens, start, block_size, axis=1)
        is_eos = (blk == eos_id) & jax.lax.dynamic_slice_in_dim(generated, start, block_size)[None]
        stop = jnp.where(is_eos.any(axis=1), start + jnp.argmax(is_eos, axis=1) + 1, stop)
    if entropy_stop > 0 and length > ENTROPY_WINDOW:  # BD3-LM checks once a sample is longer than the window
        low = (end > ENTROPY_WINDOW) & (window_entropy(tokens, end, ENTROPY_WINDOW) < entropy_stop)
        stop = jnp.where(low, jnp.minimum(stop, end - ENTROPY_WINDOW), stop)
    return stop


# decode_fn(tokens [N, Lq], t [N], cache, index) -> (logits [N, Lq, V], cache with the queries' K/V at index)
DecodeFn = Callable[[Array, Array, Any, Array], tuple[Array, Any]]
FullFn = Callable[[Array, Array], Array]  # (tokens [N, L], t [N]) -> logits [N, L, V] (block-causal or full)


def _run_block(ms: MaskedSampling, state: SamplerState, blk: Array, logits_fn: Callable, steps: int) -> SamplerState:
    """Denoises one block [N, Lb] with the inner rule, then fills what is left by argmax."""
    n, lb = blk.shape
    rule = inner_rule(ms.spec)
    inner = init_state(blk, state.rng, initial_cache(rule, n, lb, ms.mask_id + 1))
    inner = inner.replace(step=state.step, nfe=state.nfe)
    inner = ms.runner(rule)(logits_fn, inner, jnp.ones((n, lb), bool), reverse_steps(rule, steps))
    return ms.final_argmax(logits_fn, inner)


def block_sample(decode_fn: DecodeFn | None, full_fn: FullFn | None, kv_cache: Any, rng: Array, template: Array,
                 spec: SampleSpec, ms: MaskedSampling, block_size: int,
                 eos_id: int = -1) -> tuple[Array, dict[str, Array]]:
    """Exact block decoding: with `decode_fn` + `kv_cache` (block) or `full_fn` (block_nocache, also semi-AR MDLM
    decoding with a context window); the stop rules of the options need `eos_id` (the EOS that ends a sample and
    fills what follows). The `window` option (no-cache path): each block's forward sees only the `window` tokens
    ending at the block's end (the first `window` tokens for the early blocks), re-positioned from 0, so a sample
    can be longer than the model's training length (MDLM / BD3-LM sliding-window generation)."""
    n, length = spec.num_samples, template.shape[0]
    num_blocks = length // block_size
    steps = max(1, spec.steps // num_blocks)
    tokens = jnp.broadcast_to(template.astype(jnp.int32), (n, length))
    state = init_state(tokens, rng, kv_cache)
    stop_at_eos, entropy_stop = spec.option("stop_at_eos", False), spec.option("entropy_stop", 0.0)
    window = min(spec.option("window", 0) or length, length)  # the model sees tokens [end - window, end)

    def block_body(st: SamplerState, b: Array) -> SamplerState:
        start = b * block_size
        blk = jax.lax.dynamic_slice_in_dim(st.tokens, start, block_size, axis=1)
        if decode_fn is not None:
            def logits_fn(z: Array, t: Array) -> Array:
                return decode_fn(z, t, st.cache, start)[0]
        else:
            def logits_fn(z: Array, t: Array) -> Array:
                seq = jax.lax.dynamic_update_slice_in_dim(st.tokens, z, start, axis=1)
                begin = jnp.clip(start + block_size - window, 0, length - window)  # 0 when window = length
                full = full_fn(jax.lax.dynamic_slice_in_dim(seq, begin, window, axis=1), t)
                return jax.lax.dynamic_slice_in_dim(full, start - begin, block_size, axis=1)
        inner = _run_block(ms, st, blk, logits_fn, steps)
        new = st.replace(tokens=jax.lax.dynamic_update_slice_in_dim(st.tokens, inner.tokens, start, axis=1),
                         rng=inner.rng, step=inner.step, nfe=inner.nfe)
        if decode_fn is not None:  # one forward of the finished block writes its K/V (not needed after the last)
            def commit() -> Any:
                return decode_fn(inner.tokens, jnp.zeros((n,)), st.cache, start)[1]

            is_last = b == num_blocks - 1
            cache = jax.lax.cond(is_last, lambda: st.cache, commit)
            new = new.replace(cache=cache, nfe=new.nfe + (~is_last).astype(jnp.int32))
        return new

    if not stop_at_eos and entropy_stop <= 0:
        state = jax.lax.scan(lambda st, b: (block_body(st, b), None), state, jnp.arange(num_blocks))[0]
        return state.tokens, {"nfe": state.nfe}

    generated = template == ms.mask_id  # [L] (the template's unknowns are [MASK]): the stop rules look at these

    def body(carry: tuple[SamplerState, Array, Array]) -> tuple[SamplerState, Array, Array]:
        st, b, lengths = carry
        st = block_body(st, b)
        stop = stop_lengths(st.tokens, generated, b * block_size, block_size, eos_id, stop_at_eos, entropy_stop)
        return st, b + 1, jnp.where(lengths < length, lengths, stop)  # a stopped sample keeps its length

    def keep_going(carry: tuple[SamplerState, Array, Array]) -> Array:
        return (carry[1] < num_blocks) & jnp.any(carry[2] == length)

    state, _, lengths = jax.lax.while_loop(keep_going, body, (state, jnp.int32(0), jnp.full((n,), length, jnp.int32)))
    ended = (jnp.arange(length)[None] >= lengths[:, None]) & generated[None]
    return jnp.where(ended, eos_id, state.tokens), {"nfe": state.nfe, "lengths": lengths}


def approx_cache_sample(decode_fn: DecodeFn, init_cache: Callable[[int], Any], rng: Array, template: Array,
                        spec: SampleSpec, ms: MaskedSampling, block_size: int,
                        mode: str) -> tuple[Array, dict[str, Array]]:
    """Fast-dLLM prefix / dual cache, or dKV-Cache's delayed cache (mode "prefix", "dual", "dkv"), over a
    full-attention MDLM (approximate: predictions read K/V computed before the tokens around them were final)."""
    n, length = spec.num_samples, template.shape[0]
    num_blocks = length // block_size
    steps = max(1, spec.steps // num_blocks)
    refresh_every = spec.option("refresh_every", 0) if mode == "dkv" else 1
    state = init_state(jnp.broadcast_to(template.astype(jnp.int32), (n, length)), rng)
    cache = None
    for b in range(num_blocks):  # trace-time unroll: query shapes differ per block
        start, end = b * block_size, (b + 1) * block_size
        window_end = end if mode == "dual" else length
        if b == 0 or (refresh_every and b % refresh_every == 0):
            # refresh: one full forward fills the whole cache; its logits are also the block's first step
            out, cache = decode_fn(state.tokens, jnp.ones((n,)), init_cache(length), 0)
            primed = out[:, start:window_end]
        else:  # delayed: the finished block's K/V, written by the first forward that sees it decoded (this one)
            out, cache = decode_fn(state.tokens[:, start - block_size:], jnp.ones((n,)), cache,
                                   jnp.asarray(start - block_size, jnp.int32))
            primed = out[:, block_size:]
        state = state.replace(nfe=state.nfe + 1)
        if mode == "dual":  # keys: cached prefix + cached (stale) suffix, plus the block itself
            others = jax.tree.map(lambda c, s=start, e=end: jnp.concatenate([c[:, :, :s], c[:, :, e:]], axis=2), cache)

            def logits_fn(z: Array, t: Array, others=others, start=start) -> Array:
                return decode_fn(z, t, others, jnp.asarray(start, jnp.int32), valid=length - block_size)[0]
        else:  # queries: the block and the whole suffix, against the cached prefix

            def logits_fn(z: Array, t: Array, cache=cache, start=start) -> Array:
                return decode_fn(z, t, cache, jnp.asarray(start, jnp.int32))[0]
        window = state.tokens[:, start:window_end]
        active = jnp.broadcast_to(jnp.arange(window_end - start) < block_size, window.shape)
        rule = inner_rule(ms.spec)
        inner = init_state(window, state.rng, initial_cache(rule, n, window.shape[1], ms.mask_id + 1))
        inner = inner.replace(step=state.step, nfe=state.nfe)
        inner = ms.runner(rule)(logits_fn, inner, active, reverse_steps(rule, steps), primed=primed)
        inner = ms.final_argmax(logits_fn, inner, active)
        done = jnp.where(active, inner.tokens, window)
        state = state.replace(tokens=state.tokens.at[:, start:window_end].set(done), rng=inner.rng, step=inner.step,
                              nfe=inner.nfe)
    return state.tokens, {"nfe": state.nfe}
