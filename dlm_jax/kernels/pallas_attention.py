"""Pallas attention kernels: masked flash attention (training / eval, forward and backward) and split-KV cached
block attention (sampling).

The kernels are written once against the generic Pallas API and lowered by Triton on GPU (`interpret=True` runs
the same code on CPU). Layout [B, L, H, D]; scores, softmax statistics and accumulators in float32; outputs in the
inputs' dtype. On TPU the dispatcher uses `splash_attention` below (jax's splash kernel with our mask) for training
and the XLA reference for cached decoding.

Tiling. Flash forward and the backward's dq kernel: grid (query tile, batch, head), the query tile resident, an
online softmax (forward) or the dq sum (backward) over KV tiles; the backward's dk/dv kernel: grid (KV tile, batch,
head) over query tiles. Cached attention: grid (batch, head, split). Triton needs power-of-two tiles of at least 16
(dot operands), so tiles are clamped to the next power of two of the sequence length (but >= MIN_TILE), lengths
are zero-padded to a multiple of the tile (padded keys are masked, padded query rows are masked in the backward and
sliced off) and the head dim is zero-padded to a power of two >= 16 (no change to q.k; padded output columns are
dropped). Masks are `reference.allowed` evaluated on the tile's absolute indices, so the kernels and the reference
share one definition; tiles that the mask hides entirely are never visited (`_kv_ranges` for a query tile,
`_q_ranges` for a KV tile; cached: tiles past the valid length n, a traced scalar).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from dlm_jax.kernels import reference

MIN_TILE = 16  # smallest Triton dot operand
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked tile never makes exp(nan)
_SPLASH_BLOCK = 128  # splash attention tiles (its KV compute tile must be a multiple of 128 lanes)


def _tile(length: int, block: int) -> tuple[int, int]:
    """(tile, padded length): tile = block clamped to the next power of two of `length`, at least MIN_TILE."""
    if block < MIN_TILE or block & (block - 1):
        raise ValueError(f"kernel block sizes must be powers of two >= {MIN_TILE}, got {block}")
    tile = max(MIN_TILE, min(block, pl.next_power_of_2(length)))
    return tile, pl.cdiv(length, tile) * tile


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _head_dim(d: int) -> int:
    return max(MIN_TILE, pl.next_power_of_2(d))


def _compiler_params(head_dim: int, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu  # GPU only

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _scores(q, k, scale: float):
    """q k^T * scale in float32: q [Tq, D], k [Tk, D] -> [Tq, Tk]."""
    return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def _dot_t(a, b):
    """a^T b in float32: a [T, M], b [T, N] -> [M, N] (the backward's sums over query rows)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _softmax_step(q, k, v, ok, scale: float, carry):
    """One online-softmax update of (acc [Tq, D], running max m [Tq], running sum [Tq]) with a KV tile."""
    acc, m, row_sum = carry
    s = _scores(q, k, scale)
    if ok is not None:
        s = jnp.where(ok, s, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    if ok is not None:
        p = jnp.where(ok, p, 0.0)  # masked keys contribute exactly nothing, even in a fully masked tile
    corr = jnp.exp(m - m_new)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return corr[:, None] * acc + pv, m_new, corr * row_sum + jnp.sum(p, axis=1)


def _kv_tile(k_ref, v_ref, t, block_k: int):
    """(cols [1, block_k], k, v) of KV tile t of whole-sequence K / V refs."""
    start = pl.multiple_of(t * block_k, block_k)
    cols = start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    return cols, k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]


def _probs(q, k, lse, ok, scale: float):
    """The forward's softmax recomputed from its log-normaliser: exp(q k^T * scale - lse), 0 where not `ok`."""
    p = jnp.exp(_scores(q, k, scale) - lse[:, None])
    return p if ok is None else jnp.where(ok, p, 0.0)


def _init_carry(rows: int, head_dim: int):
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _finish(carry, o_ref, lse_ref=None) -> None:
    """out = acc / sum; lse = m + log(sum), the row's log-normaliser (0 for a row that sees no key)."""
    acc, m, row_sum = carry  # row_sum is 0 only for a query with no visible key (padding rows): output 0
    empty = row_sum == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, row_sum)[:, None]).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, row_sum)))


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


def _visible(mode: str, rows, cols, block_size: int, q_len: int, kv_len: int, q_pad: int, kv_pad: int):
    """`reference.allowed` on tile indices, with padded query rows / keys masked out; None when all are visible."""
    ok = reference.allowed(mode, rows, cols, block_size, kv_len)
    for idx, real, padded in ((rows, q_len, q_pad), (cols, kv_len, kv_pad)):
        if padded != real:
            ok = idx < real if ok is None else ok & (idx < real)
    return ok


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, mode: str, block_size: int, q_len: int, kv_len: int,
                  block_k: int, scale: float):
    block_q = q_ref.shape[0]
    q_lo = pl.program_id(0) * block_q
    q = q_ref[...]
    rows = q_lo + jnp.arange(block_q, dtype=jnp.int32)[:, None]

    def body(t, carry):
        cols, k, v = _kv_tile(k_ref, v_ref, t, block_k)
        ok = _visible(mode, rows, cols, block_size, q_len, kv_len, q_len, k_ref.shape[0])
        return _softmax_step(q, k, v, ok, scale, carry)

    ranges = _kv_ranges(mode, q_lo, jnp.minimum(q_lo + block_q, q_len), block_size, kv_len)
    _finish(_visit(ranges, block_k, body, _init_carry(block_q, q_ref.shape[1])), o_ref, lse_ref)


class _Tiling:
    """Tiles, padded lengths and padded head dim of one attention call; `pad_*` zero-pad [B, L, H, D] arrays."""

    def __init__(self, q_len: int, kv_len: int, d: int, block_q: int, block_k: int):
        self.q_len, self.kv_len, self.d, self.dp = q_len, kv_len, d, _head_dim(d)
        self.tq, self.q_pad = _tile(q_len, block_q)
        self.tk, self.kv_pad = _tile(kv_len, block_k)

    def pad_q(self, x: jax.Array) -> jax.Array:
        return _pad_to(_pad_to(x, 1, self.q_pad), 3, self.dp)

    def pad_kv(self, x: jax.Array) -> jax.Array:
        return _pad_to(_pad_to(x, 1, self.kv_pad), 3, self.dp)

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
        compiler_params=_compiler_params(dp, interpret), interpret=interpret, name=f"flash_attention_{mask_mode}",
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
        cols, k, v = _kv_tile(k_ref, v_ref, t, block_k)
        p = _probs(q, k, lse, _visible(mode, rows, cols, block_size, q_len, kv_len, q_len, k_ref.shape[0]), scale)
        ds = p * (_scores(do, v, 1.0) - delta[:, None])
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
        ok = _visible(mode, rows, cols, block_size, q_len, kv_len, q_ref.shape[0], kv_len)
        q, do = q_ref[pl.ds(start, block_q), :], do_ref[pl.ds(start, block_q), :]
        lse, delta = lse_ref[pl.ds(start, block_q)], delta_ref[pl.ds(start, block_q)]
        p = _probs(q, k, lse, ok, scale)
        ds = p * (_scores(do, v, 1.0) - delta[:, None])
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
    lse = _pad_to(lse[..., :q_len], 2, tiling.q_pad)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    delta = _pad_to(delta, 2, tiling.q_pad)
    q_p, do_p = tiling.pad_q(q), tiling.pad_q(do)
    k_p, v_p = tiling.pad_kv(k), tiling.pad_kv(v)
    common = dict(mode=mask_mode, block_size=block_size, q_len=q_len, kv_len=tiling.kv_len, scale=d**-0.5)
    params = _compiler_params(dp, interpret)

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


def _cached_split_kernel(n_ref, q_ref, k_ref, v_ref, kc_ref, vc_ref, acc_ref, m_ref, l_ref, *, block_len: int,
                         block_mask_mode: str, block_k: int, tiles_per_split: int, num_splits: int, scale: float):
    """Program (b, h, s < S): the block's queries against cache tiles [s * tiles_per_split, ...) below n;
    program s == S: against the block's own keys. Each writes unnormalised (acc, max, sum) for the combine."""
    split = pl.program_id(2)
    n = n_ref[()]
    q = q_ref[...]

    def body(t, carry):
        cols, k, v = _kv_tile(kc_ref, vc_ref, t, block_k)
        return _softmax_step(q, k, v, cols < n, scale, carry)

    first = split * tiles_per_split  # past the cache for s == S: no iterations
    last = jnp.minimum(first + tiles_per_split, lax.div(n + (block_k - 1), block_k))
    carry = lax.fori_loop(first, last, body, _init_carry(*q_ref.shape))
    rows = jnp.arange(q_ref.shape[0], dtype=jnp.int32)[:, None]
    cols = jnp.arange(k_ref.shape[0], dtype=jnp.int32)[None, :]
    ok = _visible(block_mask_mode, rows, cols, 1, block_len, block_len, q_ref.shape[0], k_ref.shape[0])
    mine = (split == num_splits) & (cols >= 0)  # [1, Lb]: the block's keys count in the last program only
    carry = _softmax_step(q, k_ref[...], v_ref[...], mine if ok is None else ok & mine, scale, carry)
    acc_ref[...], m_ref[...], l_ref[...] = carry


def _num_splits(programs: int, tiles: int) -> int:
    """Cache splits so that about two programs run per GPU core (flash-decoding); 1 when (b, h) fill the GPU."""
    cores = getattr(jax.devices()[0], "core_count", None) or 132  # H100 SXM: 132 SMs
    return max(1, min(tiles, pl.cdiv(2 * cores, programs)))


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
    tk, _ = _tile(lmax, block_k)
    while tk > MIN_TILE and lmax % tk:
        tk //= 2
    lmax_pad = pl.cdiv(lmax, tk) * tk
    tiles = lmax_pad // tk
    splits = num_splits or _num_splits(batch * heads, tiles)
    per_split = pl.cdiv(tiles, splits)
    splits = pl.cdiv(tiles, per_split)
    lb_pad = max(MIN_TILE, pl.next_power_of_2(lb))  # the whole block is one Triton tile: a power of two
    dp = _head_dim(d)
    q_p, k_p, v_p = (_pad_to(_pad_to(x, 1, lb_pad), 3, dp) for x in (q, k, v))
    kc_p, vc_p = (_pad_to(_pad_to(x, 1, lmax_pad), 3, dp) for x in (k_cache, v_cache))
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
        compiler_params=_compiler_params(dp, interpret), interpret=interpret,
        name=f"cached_attention_{block_mask_mode}",
    )(n, q_p, k_p, v_p, kc_p, vc_p)
    weight = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # the block program's max is finite
    out = jnp.einsum("bhsq,bhsqd->bqhd", weight, acc) / jnp.einsum("bhsq,bhsq->bqh", weight, row_sum)[..., None]
    return out[:, :lb, :, :d].astype(q.dtype)


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
    q_t, k_t, v_t = (_pad_to(x, 1, padded).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, D]
    out = jax.vmap(kernel)(q_t, k_t, v_t)
    return out.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)
