"""The one attention entry point: models call `attention(...)` / `cached_attention(...)` and never a kernel.

impl:
  xla               plain jnp (`reference.py`), any backend; 16-bit inputs on CPU train through `cpu_bf16.py` (the
                    same math, laid out for XLA:CPU's bf16 dot kernels).
  pallas            GPU: the Pallas (Triton) kernels: `pallas_flash.py` (flash forward + backward) and
                    `pallas_cached.py` (split-KV cached attention). TPU: splash attention (`splash.py`) for
                    `attention`, the XLA reference for `cached_attention`. Not available on CPU.
  cudnn             GPU, bfloat16 / float16: cuDNN's fused attention (`jax.nn.dot_product_attention`), with our
                    masks; `cached_attention` treats it as auto.
  pallas_interpret  the Pallas GPU kernels with `interpret=True` (runs anywhere, slowly: for tests).
  auto              what `AUTO` lists for (backend, op, mask mode, length) for 16-bit inputs (measured on hardware);
                    else xla.
Mask modes are documented in `reference.py`.
"""

import jax
import jax.numpy as jnp

from dlm_jax.kernels import cpu_bf16, pallas_cached, pallas_flash, reference, splash

IMPLS = ("auto", "xla", "pallas", "cudnn", "pallas_interpret")
HALF_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN attention takes, and what AUTO was timed in

# What `auto` picks: (backend, op) -> {mask mode: [(shortest key length, impl), ...] in increasing length}; the
# last entry whose length is <= the key length wins; shorter keys and everything not listed use xla. op
# "attention" is training / eval attention, "cached" is cached decoding attention (the block mask mode; length =
# the cache's Lmax). The entries hold for bfloat16 / float16 inputs, the dtype they were timed in; float32 inputs
# use xla (select pallas explicitly: it is correct in float32 on a GPU, and not timed there). Every entry is a
# measured win with the error within bf16 tolerance, by benchmarks/kernels.py on an H100 80GB
# HBM3, jax 0.11.2, bf16, 12 heads of 64 (docs/benchmarks.md, 2026-11-27):
#   attention, forward + backward, batch 4: pallas 3.5-8.9x xla at 1k-4k in every mode; cuDNN 1.4-1.5x faster than
#     pallas for full / causal at 2k-4k, pallas 1.8-2.4x faster than cuDNN for block_causal / bd3_train.
#     batch 1 at 512: pallas 1.15-1.41x xla forward + backward (causal forward alone 0.83x: causal starts at 1k).
#   cached, block mask full, 16 queries, batch 1 and 4, timed in a jitted loop: pallas 1.17-1.77x xla at
#     Lmax 1k, 0.99-6.3x at 2k-8k (23 of 24 cases faster, one tie). Causal block masks were not timed: xla.
AUTO: dict[tuple[str, str], dict[str, list[tuple[int, str]]]] = {
    ("gpu", "attention"): {"full": [(512, "pallas"), (1024, "cudnn")], "causal": [(1024, "cudnn")],
                           "block_causal": [(512, "pallas")], "bd3_train": [(512, "pallas")]},
    ("gpu", "cached"): {"full": [(1024, "pallas")]},
}


def resolve_impl(impl: str, op: str = "attention", mask_mode: str = "full", length: int = 0,
                 dtype=jnp.bfloat16) -> str:
    """`auto` -> the implementation `AUTO` lists for (backend, op, mask_mode, length, dtype); ValueError for
    unknown / unusable names."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    backend = jax.default_backend()
    if impl == "auto" or (impl == "cudnn" and op == "cached"):
        chosen = "xla"
        if jnp.dtype(dtype) in HALF_DTYPES:
            for threshold, entry in AUTO.get((backend, op), {}).get(mask_mode, []):
                if length >= threshold:
                    chosen = entry
        return chosen
    if impl in ("pallas", "cudnn") and backend == "cpu":
        raise ValueError(f"attention impl {impl!r} needs a GPU{' or TPU' if impl == 'pallas' else ''}; use "
                         "'pallas_interpret' or 'xla' on CPU")
    if impl == "cudnn" and backend != "gpu":
        raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU, this backend is {backend!r}")
    if impl == "cudnn" and jnp.dtype(dtype) not in HALF_DTYPES:
        raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got {jnp.dtype(dtype)}; set "
                         "model.dtype=bfloat16 or use attention_impl=pallas")
    return impl


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str, block_size: int) -> jax.Array:
    """cuDNN fused attention; causal as is_causal, the other masks as a constant boolean [1, 1, Lq, Lk] mask."""
    if mask_mode == "causal" and q.shape[1] == k.shape[1]:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    mask = reference.attention_bias_mask(mask_mode, q.shape[1], k.shape[1], block_size)
    return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[None, None],
                                        implementation="cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str = "full", impl: str = "auto",
              block_size: int = 1, mask: jax.Array | None = None) -> jax.Array:
    """Multi-head attention. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]. An explicit boolean `mask`
    [Lq, Lk] (a random annealed mask: `reference.anneal_mask`) runs on xla only (`auto` falls back to it)."""
    reference.check_mask_mode(mask_mode, k.shape[1], block_size)
    if mask is not None and impl not in ("auto", "xla"):
        raise ValueError(f"an explicit attention mask (mdlm.anneal_steps) needs attention_impl auto or xla, "
                         f"got {impl!r}")
    impl = "xla" if mask is not None else resolve_impl(impl, "attention", mask_mode, k.shape[1], q.dtype)
    if impl == "xla" and jax.default_backend() == "cpu" and jnp.dtype(q.dtype) in HALF_DTYPES:
        return cpu_bf16.attention(q, k, v, reference.combined_mask(mask_mode, q.shape[1], k.shape[1], block_size,
                                                                     mask))
    if impl == "xla":
        return reference.attention(q, k, v, mask_mode, block_size, mask)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask_mode, block_size)
    if impl == "pallas" and jax.default_backend() == "tpu":
        return splash.splash_attention(q, k, v, mask_mode, block_size)
    return pallas_flash.flash_attention(q, k, v, mask_mode, block_size, interpret=impl == "pallas_interpret")


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     cache_len: jax.Array, block_mask_mode: str = "full", impl: str = "auto") -> jax.Array:
    """A block of queries [B, Lb, H, D] against cache[:cache_len] ([B, Lmax, H, D]) plus the block itself."""
    reference.check_mask_mode(block_mask_mode, k.shape[1], 1, reference.BLOCK_MASK_MODES)
    impl = resolve_impl(impl, "cached", block_mask_mode, k_cache.shape[1], q.dtype)
    if impl == "xla" or (impl == "pallas" and jax.default_backend() == "tpu"):
        return reference.cached_attention(q, k, v, k_cache, v_cache, cache_len, block_mask_mode)
    return pallas_cached.cached_attention(q, k, v, k_cache, v_cache, cache_len, block_mask_mode,
                                          interpret=impl == "pallas_interpret")
