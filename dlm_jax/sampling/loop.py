"""The skeleton every sampler shares: a `SamplerState` carried through one jitted `lax.scan` / `lax.while_loop`,
the static `SampleSpec` of a sampling call with the sampler's typed options, the latent-sampler skeleton
(prior -> steps -> decode) and the categorical draw (temperature, nucleus, Gumbel-max)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from dlm_jax.config import cast, check_number, parse_literal
from dlm_jax.errors import UserError

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
    options: Any = None  # the sampler's typed options (a frozen dataclass from the family's sampler table)

    def option(self, name: str, default: Any = None) -> Any:
        """One of the sampler's options, or `default` when this sampler has no such option."""
        return getattr(self.options, name, default)


def option(default: Any, doc: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A field of a sampler-options dataclass: its default, one line of doc, and optionally the allowed values."""
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A sampler without options of its own."""


def describe_options(sampler: str, options_cls: type) -> str:
    """Lines `--sampler.key=default  doc` for every option of a sampler (what `sample --sampler=NAME --help` shows)."""
    fields = dataclasses.fields(options_cls)
    if not fields:
        return f"{sampler}: no options of its own"
    lines = [f"{sampler} options (--sampler.KEY=VALUE):"]
    for f in fields:
        choices = f" (one of {', '.join(map(str, f.metadata['choices']))})" if f.metadata.get("choices") else ""
        left = f"--sampler.{f.name}={f.default}"
        lines.append(f"  {left:<34} {f.metadata.get('doc', '')}{choices}")
    return "\n".join(lines)


def make_options(sampler: str, options_cls: type, values: dict[str, str]) -> Any:
    """The options of `sampler` from command-line strings {key: value}; unknown keys, values of the wrong type and
    values outside the allowed choices are one-line UserErrors listing the sampler's options."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    known = ", ".join(f"{n}={f.default}" for n, f in fields.items()) or "none"
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            raise UserError(f"sampler {sampler!r} has no option {key!r}; its options: {known}")
        f = fields[key]
        value = cast(f"sampler.{key}", parse_literal(raw) if isinstance(raw, str) else raw, f.default)
        check_number(f"--sampler.{key}", value)
        if f.metadata.get("choices") and value not in f.metadata["choices"]:
            raise UserError(f"--sampler.{key}={value!r} for {sampler}: choose one of "
                            f"{', '.join(map(str, f.metadata['choices']))}")
        kwargs[key] = value
    return options_cls(**kwargs)


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


def sample_latent(prior: Callable[[Array], Any], step: Callable[[Any, Array, Array], Any],
                  decode: Callable[[Any], Array], rng: Array, template: Array, num_samples: int,
                  steps: int) -> tuple[Array, dict[str, Array]]:
    """The latent-sampler skeleton (Gaussian / latent diffusion): latent = prior(rng), then `steps` times
    latent = step(latent, i, rng_i) inside one `lax.scan`, then tokens = decode(latent) [N, L]; the template's
    known tokens (>= 0) are kept. `SamplerState.cache` carries the latent; NFE counts the steps plus the decode;
    `prompt_match` is the fraction of known tokens the decode gave before they were pinned (1 without any)."""
    rng, rng_prior = jax.random.split(rng)
    template = jnp.asarray(template, jnp.int32)
    tokens = jnp.broadcast_to(template, (num_samples, template.shape[0]))
    state = init_state(tokens, rng, prior(rng_prior))

    def body(st: SamplerState, i: Array) -> SamplerState:
        rng, rng_step = jax.random.split(st.rng)
        return st.replace(rng=rng, cache=step(st.cache, i, rng_step), step=st.step + 1, nfe=st.nfe + 1)

    state = run_scan(body, state, steps)
    decoded, known = decode(state.cache), tokens >= 0
    count = known.sum()
    match = jnp.where(count > 0, ((decoded == tokens) & known).sum() / jnp.maximum(count, 1), 1.0)
    return jnp.where(known, tokens, decoded), {"nfe": state.nfe + 1, "prompt_match": match}


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

    Precision matters: low-precision Gumbel noise truncates the tail and silently lowers sample entropy. jax's
    default float32 noise never exceeds ~16.6 (a token 16 nats below the top is drawn at about half its probability,
    one 18+ below almost never); mode="high" builds each uniform from two draws, so the noise reaches ~32.
    temperature 0 means argmax. logits: [..., V] -> ids [...] int32.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return argmax_last(logits)
    logits = nucleus_logits(logits / temperature, top_p)
    gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32, mode="high")
    return argmax_last(logits + gumbel)
