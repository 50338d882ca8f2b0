"""TPU: jax's splash attention kernel (forward and backward) with our mask modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from dlm_jax.kernels import pallas_tiles as tiles
from dlm_jax.kernels import reference

_SPLASH_BLOCK = 128  # splash attention tiles (its KV compute tile must be a multiple of 128 lanes)


def splash_mask(mask_mode: str, length: int, padded: int, block_size: int):
    """The splash-attention mask object for `mask_mode` over a sequence of `length` padded to `padded`.

    full / causal without padding are splash's lazy FullMask / CausalMask; everything else is a dense NumpyMask
    of `reference.allowed` (splash derives its block sparsity from it, so fully masked tiles are skipped).
    Padded keys are masked; padded query rows see the real keys (their output is dropped).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    if padded == length and mask_mode == "full":
        return mask_lib.FullMask((length, length))
    if padded == length and mask_mode == "causal":
        return mask_lib.CausalMask((length, length))
    rows, cols = np.arange(padded)[:, None], np.arange(padded)[None, :]
    real = reference.allowed(mask_mode, rows, cols, block_size, length)
    dense = np.broadcast_to(True if real is None else real, (padded, padded)) & (cols < length)
    dense = np.where(rows < length, dense, cols < length)
    return mask_lib.NumpyMask(np.ascontiguousarray(dense, dtype=np.bool_))


@functools.lru_cache(maxsize=32)
def _splash_kernel(mask_mode: str, length: int, heads: int, block_size: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    padded = pl.cdiv(length, _SPLASH_BLOCK) * _SPLASH_BLOCK
    mask = mask_lib.MultiHeadMask([splash_mask(mask_mode, length, padded, block_size)] * heads)
    b = _SPLASH_BLOCK
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():  # the mask tables are constants, never tracers kept in this cache
        return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str, block_size: int = 1,
                     interpret: bool = False) -> jax.Array:
    """Self-attention through jax's TPU splash kernel (forward and backward kernels) with our mask semantics.

    The sequence is padded to a multiple of 128 (splash's tile). q is pre-scaled by 1/sqrt(D) in float32.
    """
    reference.check_mask_mode(mask_mode, k.shape[1], block_size)
    batch, length, heads, d = q.shape
    if k.shape[1] != length:
        raise ValueError(f"splash attention here is self-attention only, got q length {length}, kv {k.shape[1]}")
    kernel = _splash_kernel(mask_mode, length, heads, block_size, interpret)
    padded = pl.cdiv(length, _SPLASH_BLOCK) * _SPLASH_BLOCK
    q = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    q_t, k_t, v_t = (tiles.pad_to(x, 1, padded).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, D]
    out = jax.vmap(kernel)(q_t, k_t, v_t)
    return out.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)
