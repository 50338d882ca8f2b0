"""The skeleton every sampler shares: a `SamplerState` carried through one jitted `lax.scan` / `lax.while_loop`,
the static `SampleSpec` of a sampling call, and the categorical draw (temperature, nucleus, Gumbel-max)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """Static settings of one sampling call (hashable: part of the jit cache key)."""

    sampler: str  # a name in the family's sampler table
    num_samples: int
    length: int  # tokens in the output, prompt / known tokens included
    steps: int = 128  # diffusion steps T (AR: ignored, one token per forward)
    temperature: float = 1.0  # 0: argmax
    top_p: float = 1.0  # nucleus mass; 1: no truncation
    block_length: int = 0  # semi_ar: tokens per block (0: 16 or the whole length if shorter)
    inner: str = "ancestral"  # semi_ar: the sampler used inside each block
    unmask_schedule: str = "linear"  # topk_confidence: linear | cosine count of tokens left masked


@flax.struct.dataclass
class SamplerState:
    tokens: Array  # [N, L] int32 current sequence (diffusion: partially masked; AR: prefix written so far)
    rng: Array  # PRNG key, split once per step
    step: Array  # int32 scalar
    nfe: Array  # int32 scalar: number of network forward passes so far
    cache: Any = None  # sampler-specific carry (cached logits, KV cache, per-sample times ...)


def init_state(tokens: Array, rng: Array, cache: Any = None) -> SamplerState:
    zero = jnp.zeros((), jnp.int32)
    return SamplerState(tokens=tokens, rng=rng, step=zero, nfe=zero, cache=cache)


def run_scan(step_fn: Callable[[SamplerState, Array], SamplerState], state: SamplerState,
             num_steps: int) -> SamplerState:
    """Applies `step_fn(state, i)` for i = 0..num_steps-1 inside one `lax.scan` (no Python loop per step)."""
    return jax.lax.scan(lambda s, i: (step_fn(s, i), None), state, jnp.arange(num_steps))[0]


def run_while(step_fn: Callable[[SamplerState], SamplerState], state: SamplerState,
              keep_going: Callable[[SamplerState], Array]) -> SamplerState:
    """Applies `step_fn` while `keep_going(state)` (a scalar bool) inside one `lax.while_loop` (early exit)."""
    return jax.lax.while_loop(keep_going, step_fn, state)


def argmax_last(x: Array) -> Array:
    """`jnp.argmax(x, axis=-1)` (the first index of the maximum) for NaN-free x, int32, computed as a max and then
    a min over indices: two plain reductions, which XLA:CPU runs several times faster than its variadic argmax
    reduce (that reduce was a third of an MDLM sampling step on CPU, see docs/benchmarks.md)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # a NaN row gives the last index, never one out of range


def nucleus_logits(logits: Array, top_p: float) -> Array:
    """Keeps the smallest set of tokens whose probability reaches `top_p` (Holtzman et al. 2020); others -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
    kept = mass_before < top_p  # the top-1 token is always kept
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_categorical(rng: Array, logits: Array, temperature: float = 1.0, top_p: float = 1.0) -> Array:
    """Gumbel-max draw from softmax(logits / temperature), nucleus-truncated to `top_p`, in float32.

    float32 matters: low-precision Gumbel noise truncates the tail and silently lowers sample entropy.
    temperature 0 means argmax. logits: [..., V] -> ids [...] int32.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return argmax_last(logits)
    logits = nucleus_logits(logits / temperature, top_p)
    gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
    return argmax_last(logits + gumbel)
