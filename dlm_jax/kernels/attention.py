"""The one attention entry point: `attention(q, k, v, mask_mode, impl)`.

`impl` is `xla` (plain jnp, `reference.py`) for now; the Pallas kernels (`pallas`, `pallas_interpret`) plug in
here so models never change when a kernel is added. `auto` picks the best one for the backend.
"""

import jax

from dlm_jax.kernels import reference

IMPLS = ("auto", "xla")


def resolve_impl(impl: str) -> str:
    """`auto` -> the best implementation available on the default backend (today: xla everywhere)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    return "xla" if impl == "auto" else impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str = "full", impl: str = "auto",
              block_size: int = 1) -> jax.Array:
    """Multi-head attention. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]."""
    resolve_impl(impl)  # only xla exists so far
    return reference.attention(q, k, v, mask_mode, block_size)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     cache_len: jax.Array, block_mask_mode: str = "full", impl: str = "auto") -> jax.Array:
    """A block of queries [B, Lb, H, D] against cache[:cache_len] ([B, Lmax, H, D]) plus the block itself."""
    resolve_impl(impl)
    return reference.cached_attention(q, k, v, k_cache, v_cache, cache_len, block_mask_mode)
