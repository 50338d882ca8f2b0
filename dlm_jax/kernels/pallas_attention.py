"""Pallas attention kernels: masked flash attention (training / eval) and cached block attention (sampling).

Both kernels are written once against the generic Pallas API and lowered by Triton on GPU (`interpret=True` runs
the same code on CPU). Layout [B, L, H, D]; scores, softmax statistics and accumulators in float32; output in q's
dtype. On TPU the dispatcher uses `splash_attention` below (jax's splash kernel with our mask) for training and
the XLA reference for cached decoding.

Tiling. The grid is (query tile, batch, head) for flash and (batch, head) for cached attention; each program keeps
its query tile resident and runs an online softmax over KV tiles read from a whole-sequence KV block.
Triton needs power-of-two tiles of at least 16 (dot operands), so tiles are clamped to the next power of two of
the sequence length (but >= MIN_TILE), lengths are zero-padded to a multiple of the tile (padded keys are masked,
padded query rows are sliced off) and the head dim is zero-padded to a power of two >= 16 (no change to q.k;
padded output columns are dropped). Masks are `reference.allowed` evaluated on the tile's absolute indices, so
the kernels and the reference share one definition; KV tiles that no query of the tile can see are never
visited (causal / block_causal: tiles past the tile's last visible key; bd3_train: one range in the noisy half,
one in the clean half; cached: tiles past the valid length n, which is a traced scalar).
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


def _softmax_step(q, k, v, ok, scale: float, carry):
    """One online-softmax update of (acc [Tq, D], running max m [Tq], running sum [Tq]) with a KV tile."""
    acc, m, row_sum = carry
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    if ok is not None:
        s = jnp.where(ok, s, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    if ok is not None:
        p = jnp.where(ok, p, 0.0)  # masked keys contribute exactly nothing, even in a fully masked tile
    corr = jnp.exp(m - m_new)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return corr[:, None] * acc + pv, m_new, corr * row_sum + jnp.sum(p, axis=1)


def _init_carry(rows: int, head_dim: int):
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _finish(carry, o_ref) -> None:
    acc, _, row_sum = carry  # row_sum is 0 only for a query with no visible key (none in our masks): output 0
    o_ref[...] = (acc / jnp.where(row_sum == 0.0, 1.0, row_sum)[:, None]).astype(o_ref.dtype)


def _ceil_to(x, m: int):
    return lax.div(x + (m - 1), m) * m


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
    noisy = (lax.div(q_lo, block_size) * block_size,
             jnp.where(has_noisy, jnp.minimum(_ceil_to(last_noisy + 1, block_size), half), 0))
    from_noisy = jnp.where(has_noisy, lax.div(last_noisy, block_size) * block_size, 0)
    from_clean = jnp.where(has_clean, jnp.minimum(_ceil_to(q_hi - half, block_size), half), 0)
    return [noisy, (half, half + jnp.maximum(from_noisy, from_clean))]


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, *, mode: str, block_size: int, q_len: int, kv_len: int,
                  block_k: int, scale: float):
    block_q = q_ref.shape[0]
    q_lo = pl.program_id(0) * block_q
    q = q_ref[...]
    rows = q_lo + jnp.arange(block_q, dtype=jnp.int32)[:, None]

    def body(t, carry):
        start = pl.multiple_of(t * block_k, block_k)
        cols = start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
        ok = reference.allowed(mode, rows, cols, block_size, kv_len)
        if k_ref.shape[0] != kv_len:  # padded keys
            ok = cols < kv_len if ok is None else ok & (cols < kv_len)
        k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        return _softmax_step(q, k, v, ok, scale, carry)

    carry = _init_carry(block_q, q_ref.shape[1])
    done = 0  # tiles already visited: ranges are ordered, so a tile shared by two ranges is visited once
    for lo, hi in _kv_ranges(mode, q_lo, jnp.minimum(q_lo + block_q, q_len), block_size, kv_len):
        lo_t, hi_t = jnp.maximum(lax.div(lo, block_k), done), lax.div(hi + (block_k - 1), block_k)
        carry = lax.fori_loop(lo_t, hi_t, body, carry)
        done = jnp.maximum(done, hi_t)
    _finish(carry, o_ref)


def flash_forward(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str, block_size: int = 1,
                  block_q: int = 128, block_k: int = 64, interpret: bool = False) -> jax.Array:
    """Masked flash attention forward. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype."""
    reference.check_mask_mode(mask_mode, k.shape[1], block_size)
    batch, q_len, heads, d = q.shape
    kv_len = k.shape[1]
    tq, q_pad = _tile(q_len, block_q)
    tk, kv_pad = _tile(kv_len, block_k)
    dp = _head_dim(d)
    q_p = _pad_to(_pad_to(q, 1, q_pad), 3, dp)
    k_p, v_p = (_pad_to(_pad_to(x, 1, kv_pad), 3, dp) for x in (k, v))
    kernel = functools.partial(_flash_kernel, mode=mask_mode, block_size=block_size, q_len=q_len, kv_len=kv_len,
                               block_k=tk, scale=d**-0.5)
    q_spec = pl.BlockSpec((None, tq, None, dp), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, kv_pad, None, dp), lambda i, b, h: (b, 0, h, 0))
    out = pl.pallas_call(
        kernel, grid=(q_pad // tq, batch, heads), in_specs=[q_spec, kv_spec, kv_spec], out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype), compiler_params=_compiler_params(dp, interpret),
        interpret=interpret, name=f"flash_attention_{mask_mode}",
    )(q_p, k_p, v_p)
    return out[:, :q_len, :, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str, block_size: int = 1,
                    block_q: int = 128, block_k: int = 64, interpret: bool = False) -> jax.Array:
    """`flash_forward`, differentiable: the backward pass recomputes the reference attention and takes its VJP."""
    return flash_forward(q, k, v, mask_mode, block_size, block_q, block_k, interpret)


def _flash_fwd(q, k, v, mask_mode, block_size, block_q, block_k, interpret):
    return flash_forward(q, k, v, mask_mode, block_size, block_q, block_k, interpret), (q, k, v)


def _flash_bwd(mask_mode, block_size, block_q, block_k, interpret, res, g):
    del block_q, block_k, interpret
    _, vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, mask_mode, block_size), *res)
    return vjp(g)


flash_attention.defvjp(_flash_fwd, _flash_bwd)


def _cached_kernel(n_ref, q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref, *, block_len: int, block_mask_mode: str,
                   block_k: int, scale: float):
    n = n_ref[()]
    q = q_ref[...]

    def body(t, carry):
        start = pl.multiple_of(t * block_k, block_k)
        cols = start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
        k, v = kc_ref[pl.ds(start, block_k), :], vc_ref[pl.ds(start, block_k), :]
        return _softmax_step(q, k, v, cols < n, scale, carry)

    carry = lax.fori_loop(0, lax.div(n + (block_k - 1), block_k), body, _init_carry(*q_ref.shape))  # tiles < n
    rows = jnp.arange(q_ref.shape[0], dtype=jnp.int32)[:, None]
    cols = jnp.arange(k_ref.shape[0], dtype=jnp.int32)[None, :]
    ok = reference.allowed(block_mask_mode, rows, cols)
    if k_ref.shape[0] != block_len:  # padded block keys
        ok = cols < block_len if ok is None else ok & (cols < block_len)
    _finish(_softmax_step(q, k_ref[...], v_ref[...], ok, scale, carry), o_ref)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     cache_len: jax.Array, block_mask_mode: str = "full", block_k: int = 128,
                     interpret: bool = False) -> jax.Array:
    """Pallas version of `reference.cached_attention` (forward only: sampling never differentiates it).

    q/k/v: [B, Lb, H, D]; k_cache/v_cache: [B, Lmax, H, D] of which [:cache_len] is valid (traced int32 scalar).
    The KV tile is the largest power of two <= block_k dividing Lmax (>= 16); otherwise the cache is padded,
    which copies it on every call, so keep Lmax a multiple of 16.
    """
    reference.check_mask_mode(block_mask_mode, k.shape[1], 1, reference.BLOCK_MASK_MODES)
    batch, lb, heads, d = q.shape
    lmax = k_cache.shape[1]
    tk, _ = _tile(lmax, block_k)
    while tk > MIN_TILE and lmax % tk:
        tk //= 2
    lmax_pad = pl.cdiv(lmax, tk) * tk
    lb_pad = max(MIN_TILE, pl.next_power_of_2(lb))  # the whole block is one Triton tile: a power of two
    dp = _head_dim(d)
    q_p, k_p, v_p = (_pad_to(_pad_to(x, 1, lb_pad), 3, dp) for x in (q, k, v))
    kc_p, vc_p = (_pad_to(_pad_to(x, 1, lmax_pad), 3, dp) for x in (k_cache, v_cache))
    n = jnp.clip(jnp.asarray(cache_len, jnp.int32).reshape(()), 0, lmax)
    kernel = functools.partial(_cached_kernel, block_len=lb, block_mask_mode=block_mask_mode, block_k=tk,
                               scale=d**-0.5)
    blk_spec = pl.BlockSpec((None, lb_pad, None, dp), lambda b, h: (b, 0, h, 0))
    cache_spec = pl.BlockSpec((None, lmax_pad, None, dp), lambda b, h: (b, 0, h, 0))
    out = pl.pallas_call(
        kernel, grid=(batch, heads),
        in_specs=[pl.BlockSpec((), lambda b, h: ()), blk_spec, blk_spec, blk_spec, cache_spec, cache_spec],
        out_specs=blk_spec, out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
        compiler_params=_compiler_params(dp, interpret), interpret=interpret,
        name=f"cached_attention_{block_mask_mode}",
    )(n, q_p, k_p, v_p, kc_p, vc_p)
    return out[:, :lb, :, :d]


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
