"""The one attention entry point: models call `attention(...)` / `cached_attention(...)` and never a kernel.

impl:
  xla               plain jnp (`reference.py`), any backend.
  pallas            GPU: the Pallas (Triton) kernels of `pallas_attention.py`. TPU: splash attention for
                    `attention`, the XLA reference for `cached_attention`. Not available on CPU.
  pallas_interpret  the Pallas GPU kernels with `interpret=True` (runs anywhere, slowly: for tests).
  auto              xla for now on every backend: the Pallas GPU / TPU paths lower and export for cuda and tpu
                    (tests/test_kernels.py) but have not yet run on real hardware; select them with
                    model.attention_impl=pallas, and make them the auto choice once checked and timed there.
Mask modes are documented in `reference.py`.
"""

import jax

from dlm_jax.kernels import pallas_attention, reference

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


def resolve_impl(impl: str) -> str:
    """`auto` -> the best implementation for `jax.default_backend()`; ValueError for unknown / unusable names."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        return "xla"
    if impl == "pallas" and jax.default_backend() == "cpu":
        raise ValueError("attention impl 'pallas' needs a GPU or TPU; use 'pallas_interpret' or 'xla' on CPU")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str = "full", impl: str = "auto",
              block_size: int = 1) -> jax.Array:
    """Multi-head attention. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]."""
    reference.check_mask_mode(mask_mode, k.shape[1], block_size)
    impl = resolve_impl(impl)
    if impl == "xla":
        return reference.attention(q, k, v, mask_mode, block_size)
    if impl == "pallas" and jax.default_backend() == "tpu":
        return pallas_attention.splash_attention(q, k, v, mask_mode, block_size)
    return pallas_attention.flash_attention(q, k, v, mask_mode, block_size, interpret=impl == "pallas_interpret")


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     cache_len: jax.Array, block_mask_mode: str = "full", impl: str = "auto") -> jax.Array:
    """A block of queries [B, Lb, H, D] against cache[:cache_len] ([B, Lmax, H, D]) plus the block itself."""
    reference.check_mask_mode(block_mask_mode, k.shape[1], 1, reference.BLOCK_MASK_MODES)
    impl = resolve_impl(impl)
    if impl == "xla" or (impl == "pallas" and jax.default_backend() == "tpu"):
        return reference.cached_attention(q, k, v, k_cache, v_cache, cache_len, block_mask_mode)
    return pallas_attention.cached_attention(q, k, v, k_cache, v_cache, cache_len, block_mask_mode,
                                             interpret=impl == "pallas_interpret")
