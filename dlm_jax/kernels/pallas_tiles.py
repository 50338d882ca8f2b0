"""What the Pallas attention kernels share: power-of-two tiles and padding, the online-softmax update over a KV
tile, and `reference.allowed` evaluated on tile indices (so kernels and the reference share one mask definition).

Triton needs power-of-two tiles of at least 16 (dot operands), so tiles are clamped to the next power of two of
the sequence length (but >= MIN_TILE), lengths are zero-padded to a multiple of the tile (padded keys are masked,
padded query rows are masked in the backward and sliced off) and the head dim is zero-padded to a power of two
>= 16 (no change to q.k; padded output columns are dropped). Scores, softmax statistics and accumulators are
float32; outputs keep the inputs' dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from dlm_jax.kernels import reference

MIN_TILE = 16  # smallest Triton dot operand
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked tile never makes exp(nan)


def tile_size(length: int, block: int) -> tuple[int, int]:
    """(tile, padded length): tile = block clamped to the next power of two of `length`, at least MIN_TILE."""
    if block < MIN_TILE or block & (block - 1):
        raise ValueError(f"kernel block sizes must be powers of two >= {MIN_TILE}, got {block}")
    tile = max(MIN_TILE, min(block, pl.next_power_of_2(length)))
    return tile, pl.cdiv(length, tile) * tile


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def padded_head_dim(d: int) -> int:
    return max(MIN_TILE, pl.next_power_of_2(d))


def compiler_params(head_dim: int, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu  # GPU only

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def scores(q, k, scale: float):
    """q k^T * scale in float32: q [Tq, D], k [Tk, D] -> [Tq, Tk]."""
    return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def softmax_step(q, k, v, ok, scale: float, carry):
    """One online-softmax update of (acc [Tq, D], running max m [Tq], running sum [Tq]) with a KV tile."""
    acc, m, row_sum = carry
    s = scores(q, k, scale)
    if ok is not None:
        s = jnp.where(ok, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    if ok is not None:
        p = jnp.where(ok, p, 0.0)  # masked keys contribute exactly nothing, even in a fully masked tile
    corr = jnp.exp(m - m_new)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return corr[:, None] * acc + pv, m_new, corr * row_sum + jnp.sum(p, axis=1)


def kv_tile(k_ref, v_ref, t, block_k: int):
    """(cols [1, block_k], k, v) of KV tile t of whole-sequence K / V refs."""
    start = pl.multiple_of(t * block_k, block_k)
    cols = start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    return cols, k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]


def init_carry(rows: int, head_dim: int):
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def finish(carry, o_ref, lse_ref=None) -> None:
    """out = acc / sum; lse = m + log(sum), the row's log-normaliser (0 for a row that sees no key)."""
    acc, m, row_sum = carry  # row_sum is 0 only for a query with no visible key (padding rows): output 0
    empty = row_sum == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, row_sum)[:, None]).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, row_sum)))


def visible(mode: str, rows, cols, block_size: int, q_len: int, kv_len: int, q_pad: int, kv_pad: int):
    """`reference.allowed` on tile indices, with padded query rows / keys masked out; None when all are visible."""
    ok = reference.allowed(mode, rows, cols, block_size, kv_len)
    for idx, real, padded in ((rows, q_len, q_pad), (cols, kv_len, kv_pad)):
        if padded != real:
            ok = idx < real if ok is None else ok & (idx < real)
    return ok
