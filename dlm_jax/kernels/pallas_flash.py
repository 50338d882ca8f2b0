"""Pallas flash attention for training / eval: a masked forward that also returns the rows' log-normaliser, and
the FlashAttention-2 backward (Dao 2023) as two kernels, dq over query tiles and (dk, dv) over KV tiles.

Grids: (query tile, batch, head) for the forward and dq, (KV tile, batch, head) for dk/dv. Each program keeps its
own tile resident and loops over the tiles of the other side that its mask can see (`_kv_ranges` for a query
tile, `_q_ranges` for a KV tile): fully masked tiles are never visited. Written once against the generic Pallas
API, lowered by Triton on GPU; `interpret=True` runs the same code on CPU (tests).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dlm_jax.kernels import pallas_tiles as tiles
from dlm_jax.kernels import reference


def _dot_t(a, b):
    """a^T b in float32: a [T, M], b [T, N] -> [M, N] (the backward's sums over query rows)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _probs(q, k, lse, ok, scale: float):
    """The forward's softmax recomputed from its log-normaliser: exp(q k^T * scale - lse), 0 where not `ok`."""
    p = jnp.exp(tiles.scores(q, k, scale) - lse[:, None])
    return p if ok is None else jnp.where(ok, p, 0.0)


def _ceil_to(x, m: int):
    return lax.div(x + (m - 1), m) * m


def _floor_to(x, m: int):
    return lax.div(x, m) * m


def _kv_ranges(mode: str, q_lo, q_hi, block_size: int, kv_len: int) -> list:
    """Ordered key ranges [lo, hi) (a superset of) what queries [q_lo, q_hi) may see under `mode`; may be empty."""
    if mode == "full":
        return [(0, kv_len)]
    if mode == "causal":
        return [(0, jnp.minimum(q_hi, kv_len))]
    if mode == "block_causal":
        return [(0, jnp.minimum(_ceil_to(q_hi, block_size), kv_len))]
    # bd3_train: noisy queries see their own block in the noisy half and the earlier blocks of the clean half;
    # clean queries see the clean half up to the end of their block.
    half = kv_len // 2
    has_noisy, has_clean = q_lo < half, q_hi > half
    last_noisy = jnp.minimum(q_hi, half) - 1
    noisy = (_floor_to(q_lo, block_size),
             jnp.where(has_noisy, jnp.minimum(_ceil_to(last_noisy + 1, block_size), half), 0))
    from_noisy = jnp.where(has_noisy, _floor_to(last_noisy, block_size), 0)
    from_clean = jnp.where(has_clean, jnp.minimum(_ceil_to(q_hi - half, block_size), half), 0)
    return [noisy, (half, half + jnp.maximum(from_noisy, from_clean))]


def _q_ranges(mode: str, k_lo, k_hi, block_size: int, q_len: int) -> list:
    """Ordered query ranges [lo, hi) (a superset of) the queries that may see keys [k_lo, k_hi) under `mode`."""
    if mode == "full":
        return [(0, q_len)]
    if mode == "causal":
        return [(jnp.minimum(k_lo, q_len), q_len)]
    if mode == "block_causal":
        return [(jnp.minimum(_floor_to(k_lo, block_size), q_len), q_len)]
    # bd3_train (q_len == kv_len == 2 * half): a noisy key is seen by the noisy queries of its block; a clean key
    # of block c by the noisy queries of blocks > c and by the clean queries of blocks >= c.
    half = q_len // 2
    has_noisy, has_clean = k_lo < half, k_hi > half
    last_noisy = jnp.minimum(k_hi, half) - 1
    clean_block = _floor_to(jnp.maximum(k_lo, half) - half, block_size)  # first clean key's block start
    lo = jnp.minimum(jnp.where(has_noisy, _floor_to(k_lo, block_size), half),
                     jnp.where(has_clean, jnp.minimum(clean_block + block_size, half), half))
    hi = jnp.maximum(jnp.where(has_noisy, jnp.minimum(_ceil_to(last_noisy + 1, block_size), half), 0),
                     has_clean.astype(jnp.int32) * half)  # where() of two Python ints does not lower in Triton
    return [(lo, hi), (jnp.where(has_clean, half + clean_block, 0), has_clean.astype(jnp.int32) * q_len)]


def _visit(ranges: list, tile: int, body, carry):
    """Runs `body(t, carry)` over the tiles t of the ordered `ranges`, each tile once."""
    done = 0  # tiles already visited: ranges are ordered, so a tile shared by two ranges is visited once
    for lo, hi in ranges:
        lo_t, hi_t = jnp.maximum(lax.div(lo, tile), done), lax.div(hi + (tile - 1), tile)
        carry = lax.fori_loop(lo_t, hi_t, body, carry)
        done = jnp.maximum(done, hi_t)
    return carry


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, mode: str, block_size: int, q_len: int, kv_len: int,
                  block_k: int, scale: float):
    block_q = q_ref.shape[0]
    q_lo = pl.program_id(0) * block_q
    q = q_ref[...]
    rows = q_lo + jnp.arange(block_q, dtype=jnp.int32)[:, None]

    def body(t, carry):
        cols, k, v = tiles.kv_tile(k_ref, v_ref, t, block_k)
        ok = tiles.visible(mode, rows, cols, block_size, q_len, kv_len, q_len, k_ref.shape[0])
        return tiles.softmax_step(q, k, v, ok, scale, carry)

    ranges = _kv_ranges(mode, q_lo, jnp.minimum(q_lo + block_q, q_len), block_size, kv_len)
    tiles.finish(_visit(ranges, block_k, body, tiles.init_carry(block_q, q_ref.shape[1])), o_ref, lse_ref)


class _Tiling:
    """Tiles, padded lengths and padded head dim of one attention call; `pad_*` zero-pad [B, L, H, D] arrays."""

    def __init__(self, q_len: int, kv_len: int, d: int, block_q: int, block_k: int):
        self.q_len, self.kv_len, self.d, self.dp = q_len, kv_len, d, tiles.padded_head_dim(d)
        self.tq, self.q_pad = tiles.tile_size(q_len, block_q)
        self.tk, self.kv_pad = tiles.tile_size(kv_len, block_k)

    def pad_q(self, x: jax.Array) -> jax.Array:
        return tiles.pad_to(tiles.pad_to(x, 1, self.q_pad), 3, self.dp)

    def pad_kv(self, x: jax.Array) -> jax.Array:
        return tiles.pad_to(tiles.pad_to(x, 1, self.kv_pad), 3, self.dp)

    def unpad_q(self, x: jax.Array) -> jax.Array:
        return x[:, : self.q_len, :, : self.d]

    def unpad_kv(self, x: jax.Array) -> jax.Array:
        return x[:, : self.kv_len, :, : self.d]


def _flash_forward(q, k, v, mask_mode: str, block_size: int, block_q: int, block_k: int, interpret: bool):
    """(out [B, Lq, H, D], lse [B, H, Lq_pad] float32, the log-normaliser of every query row)."""
    reference.check_mask_mode(mask_mode, k.shape[1], block_size)
    batch, q_len, heads, d = q.shape
    tiling = _Tiling(q_len, k.shape[1], d, block_q, block_k)
    tq, dp = tiling.tq, tiling.dp
    kernel = functools.partial(_flash_kernel, mode=mask_mode, block_size=block_size, q_len=q_len,
                               kv_len=tiling.kv_len, block_k=tiling.tk, scale=d**-0.5)
    q_spec = pl.BlockSpec((None, tq, None, dp), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, tiling.kv_pad, None, dp), lambda i, b, h: (b, 0, h, 0))
    lse_spec = pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i))
    out, lse = pl.pallas_call(
        kernel, grid=(tiling.q_pad // tq, batch, heads), in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct((batch, tiling.q_pad, heads, dp), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, tiling.q_pad), jnp.float32)],
        compiler_params=tiles.compiler_params(dp, interpret), interpret=interpret, name=f"flash_attention_{mask_mode}",
    )(tiling.pad_q(q), tiling.pad_kv(k), tiling.pad_kv(v))
    return tiling.unpad_q(out), lse


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, mode: str, block_size: int, q_len: int,
               kv_len: int, block_k: int, scale: float):
    """dq = scale * sum_j ds_ij k_j over the visible KV tiles of one query tile (ds = p * (dp - delta))."""
    block_q = q_ref.shape[0]
    q_lo = pl.program_id(0) * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = q_lo + jnp.arange(block_q, dtype=jnp.int32)[:, None]

    def body(t, dq):
        cols, k, v = tiles.kv_tile(k_ref, v_ref, t, block_k)
        p = _probs(q, k, lse, tiles.visible(mode, rows, cols, block_size, q_len, kv_len, q_len, k_ref.shape[0]), scale)
        ds = p * (tiles.scores(do, v, 1.0) - delta[:, None])
        return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

    ranges = _kv_ranges(mode, q_lo, jnp.minimum(q_lo + block_q, q_len), block_size, kv_len)
    dq = _visit(ranges, block_k, body, jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, mode: str, block_size: int,
                 q_len: int, kv_len: int, block_q: int, scale: float):
    """dv = sum_i p_ij do_i and dk = scale * sum_i ds_ij q_i over the query tiles that see one KV tile."""
    block_k = k_ref.shape[0]
    k_lo = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]
    cols = k_lo + jnp.arange(block_k, dtype=jnp.int32)[None, :]

    def body(t, carry):
        dk, dv = carry
        start = pl.multiple_of(t * block_q, block_q)
        rows = start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
        ok = tiles.visible(mode, rows, cols, block_size, q_len, kv_len, q_ref.shape[0], kv_len)
        q, do = q_ref[pl.ds(start, block_q), :], do_ref[pl.ds(start, block_q), :]
        lse, delta = lse_ref[pl.ds(start, block_q)], delta_ref[pl.ds(start, block_q)]
        p = _probs(q, k, lse, ok, scale)
        ds = p * (tiles.scores(do, v, 1.0) - delta[:, None])
        return dk + _dot_t(ds.astype(q.dtype), q), dv + _dot_t(p.astype(do.dtype), do)

    ranges = _q_ranges(mode, k_lo, jnp.minimum(k_lo + block_k, kv_len), block_size, q_len)
    zeros = jnp.zeros(k_ref.shape, jnp.float32)
    dk, dv = _visit(ranges, block_q, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_backward(q, k, v, out, lse, do, mask_mode: str, block_size: int = 1, block: int = 64,
                   interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of masked attention (FlashAttention-2 backward: Dao 2023), from the forward's `lse`.

    With p = exp(q k^T * scale - lse) and delta_i = sum_d out_id do_id: dv = p^T do, ds = p * (do v^T - delta),
    dq = scale * ds k, dk = scale * ds^T q. Two kernels: dq over query tiles, (dk, dv) over KV tiles; each visits
    only the tiles its mask can see. `lse`: [B, H, >= Lq] from the forward (its padding rows are dropped).
    """
    batch, q_len, heads, d = q.shape
    tiling = _Tiling(q_len, k.shape[1], d, block, block)
    tq, tk, dp = tiling.tq, tiling.tk, tiling.dp
    lse = tiles.pad_to(lse[..., :q_len], 2, tiling.q_pad)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    delta = tiles.pad_to(delta, 2, tiling.q_pad)
    q_p, do_p = tiling.pad_q(q), tiling.pad_q(do)
    k_p, v_p = tiling.pad_kv(k), tiling.pad_kv(v)
    common = dict(mode=mask_mode, block_size=block_size, q_len=q_len, kv_len=tiling.kv_len, scale=d**-0.5)
    params = tiles.compiler_params(dp, interpret)

    q_tile = pl.BlockSpec((None, tq, None, dp), lambda i, b, h: (b, i, h, 0))
    row_tile = pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i))
    kv_all = pl.BlockSpec((None, tiling.kv_pad, None, dp), lambda i, b, h: (b, 0, h, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=tk, **common), grid=(tiling.q_pad // tq, batch, heads),
        in_specs=[q_tile, kv_all, kv_all, q_tile, row_tile, row_tile], out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype), compiler_params=params, interpret=interpret,
        name=f"flash_attention_dq_{mask_mode}",
    )(q_p, k_p, v_p, do_p, lse, delta)

    kv_tile = pl.BlockSpec((None, tk, None, dp), lambda j, b, h: (b, j, h, 0))
    q_all = pl.BlockSpec((None, tiling.q_pad, None, dp), lambda j, b, h: (b, 0, h, 0))
    row_all = pl.BlockSpec((None, None, tiling.q_pad), lambda j, b, h: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=tq, **common), grid=(tiling.kv_pad // tk, batch, heads),
        in_specs=[q_all, kv_tile, kv_tile, q_all, row_all, row_all], out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k_p.shape, k.dtype), jax.ShapeDtypeStruct(v_p.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name=f"flash_attention_dkdv_{mask_mode}",
    )(q_p, k_p, v_p, do_p, lse, delta)
    return tiling.unpad_q(dq), tiling.unpad_kv(dk), tiling.unpad_kv(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str, block_size: int = 1,
                    block_q: int = 128, block_k: int = 64, bwd_block: int = 64, interpret: bool = False) -> jax.Array:
    """Masked flash attention with Pallas kernels both ways (forward tiles block_q x block_k, backward bwd_block).

    q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype.
    """
    return _flash_forward(q, k, v, mask_mode, block_size, block_q, block_k, interpret)[0]


def _flash_fwd(q, k, v, mask_mode, block_size, block_q, block_k, bwd_block, interpret):
    out, lse = _flash_forward(q, k, v, mask_mode, block_size, block_q, block_k, interpret)
    return out, (q, k, v, out, lse)


def _flash_bwd(mask_mode, block_size, block_q, block_k, bwd_block, interpret, res, g):
    del block_q, block_k
    q, k, v, out, lse = res
    return flash_backward(q, k, v, out, lse, g, mask_mode, block_size, bwd_block, interpret)


flash_attention.defvjp(_flash_fwd, _flash_bwd)
