"""Pallas cached block attention for sampling: a block of queries against a KV cache of traced valid length n plus
the block itself, split over the cache (flash-decoding) so that small batches still fill the GPU."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dlm_jax.kernels import pallas_tiles as tiles
from dlm_jax.kernels import reference


def _cached_split_kernel(n_ref, q_ref, k_ref, v_ref, kc_ref, vc_ref, acc_ref, m_ref, l_ref, *, block_len: int,
                         block_mask_mode: str, block_k: int, tiles_per_split: int, num_splits: int, scale: float):
    """Program (b, h, s < S): the block's queries against cache tiles [s * tiles_per_split, ...) below n;
    program s == S: against the block's own keys. Each writes unnormalised (acc, max, sum) for the combine."""
    split = pl.program_id(2)
    n = n_ref[()]
    q = q_ref[...]

    def body(t, carry):
        cols, k, v = tiles.kv_tile(kc_ref, vc_ref, t, block_k)
        return tiles.softmax_step(q, k, v, cols < n, scale, carry)

    first = split * tiles_per_split  # past the cache for s == S: no iterations
    last = jnp.minimum(first + tiles_per_split, lax.div(n + (block_k - 1), block_k))
    carry = lax.fori_loop(first, last, body, tiles.init_carry(*q_ref.shape))
    rows = jnp.arange(q_ref.shape[0], dtype=jnp.int32)[:, None]
    cols = jnp.arange(k_ref.shape[0], dtype=jnp.int32)[None, :]
    ok = tiles.visible(block_mask_mode, rows, cols, 1, block_len, block_len, q_ref.shape[0], k_ref.shape[0])
    mine = (split == num_splits) & (cols >= 0)  # [1, Lb]: the block's keys count in the last program only
    carry = tiles.softmax_step(q, k_ref[...], v_ref[...], mine if ok is None else ok & mine, scale, carry)
    acc_ref[...], m_ref[...], l_ref[...] = carry


def _num_splits(programs: int, num_tiles: int) -> int:
    """Cache splits so that about two programs run per GPU core (flash-decoding); 1 when (b, h) fill the GPU."""
    cores = getattr(jax.devices()[0], "core_count", None) or 132  # H100 SXM: 132 SMs
    return max(1, min(num_tiles, pl.cdiv(2 * cores, programs)))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     cache_len: jax.Array, block_mask_mode: str = "full", block_k: int = 128,
                     num_splits: int | None = None, interpret: bool = False) -> jax.Array:
    """Pallas version of `reference.cached_attention` (forward only: sampling never differentiates it).

    q/k/v: [B, Lb, H, D]; k_cache/v_cache: [B, Lmax, H, D] of which [:cache_len] is valid (traced int32 scalar).
    Split-KV (flash-decoding, Dao et al. 2023): grid (B, H, S + 1); S programs per head each reduce one slice of
    the valid cache, one more the block's own keys, and a jnp combine rescales the S + 1 partial softmaxes:
    out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s. S (`num_splits`, default: about 2 programs per GPU
    core) is static; slices past cache_len cost no reads. The KV tile is the largest power of two <= block_k
    dividing Lmax (>= 16); otherwise the cache is padded, which copies it on every call, so keep Lmax a multiple
    of 16.
    """
    reference.check_mask_mode(block_mask_mode, k.shape[1], 1, reference.BLOCK_MASK_MODES)
    batch, lb, heads, d = q.shape
    lmax = k_cache.shape[1]
    tk, _ = tiles.tile_size(lmax, block_k)
    while tk > tiles.MIN_TILE and lmax % tk:
        tk //= 2
    lmax_pad = pl.cdiv(lmax, tk) * tk
    num_tiles = lmax_pad // tk
    splits = num_splits or _num_splits(batch * heads, num_tiles)
    per_split = pl.cdiv(num_tiles, splits)
    splits = pl.cdiv(num_tiles, per_split)
    lb_pad = max(tiles.MIN_TILE, pl.next_power_of_2(lb))  # the whole block is one Triton tile: a power of two
    dp = tiles.padded_head_dim(d)
    q_p, k_p, v_p = (tiles.pad_to(tiles.pad_to(x, 1, lb_pad), 3, dp) for x in (q, k, v))
    kc_p, vc_p = (tiles.pad_to(tiles.pad_to(x, 1, lmax_pad), 3, dp) for x in (k_cache, v_cache))
    n = jnp.clip(jnp.asarray(cache_len, jnp.int32).reshape(()), 0, lmax)
    kernel = functools.partial(_cached_split_kernel, block_len=lb, block_mask_mode=block_mask_mode, block_k=tk,
                               tiles_per_split=per_split, num_splits=splits, scale=d**-0.5)
    blk_spec = pl.BlockSpec((None, lb_pad, None, dp), lambda b, h, s: (b, 0, h, 0))
    cache_spec = pl.BlockSpec((None, lmax_pad, None, dp), lambda b, h, s: (b, 0, h, 0))
    acc_spec = pl.BlockSpec((None, None, None, lb_pad, dp), lambda b, h, s: (b, h, s, 0, 0))
    row_spec = pl.BlockSpec((None, None, None, lb_pad), lambda b, h, s: (b, h, s, 0))
    parts = (batch, heads, splits + 1, lb_pad)
    acc, m, row_sum = pl.pallas_call(
        kernel, grid=(batch, heads, splits + 1),
        in_specs=[pl.BlockSpec((), lambda b, h, s: ()), blk_spec, blk_spec, blk_spec, cache_spec, cache_spec],
        out_specs=[acc_spec, row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((*parts, dp), jnp.float32), jax.ShapeDtypeStruct(parts, jnp.float32),
                   jax.ShapeDtypeStruct(parts, jnp.float32)],
        compiler_params=tiles.compiler_params(dp, interpret), interpret=interpret,
        name=f"cached_attention_{block_mask_mode}",
    )(n, q_p, k_p, v_p, kc_p, vc_p)
    weight = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # the block program's max is finite
    out = jnp.einsum("bhsq,bhsqd->bqhd", weight, acc) / jnp.einsum("bhsq,bhsq->bqh", weight, row_sum)[..., None]
    return out[:, :lb, :, :d].astype(q.dtype)
