"""Reference attention math shaped for XLA:CPU's bfloat16 kernels (16-bit training on a CPU).

XLA:CPU multiplies bf16 x bf16 -> f32 at about 2x its float32 speed (the CPU's AVX512-BF16 dot instructions), but only
for dots whose operands are row-major and contracted on the lhs's last / the rhs's second-to-last axis; every other
bf16 dot is converted to float32 first. Autodiff of `reference.attention` produces mostly the other kind (a
transposed operand, a float32 cotangent). Here every dot of the forward and of a hand-written VJP is of the fast
kind: the layout is head-major [B, H, L, D] and each transposed operand is a real row-major copy
(`row_major_swap`). The math is `reference.attention`'s (softmax in float32, 1/sqrt(d) scaling, the same masks),
the probabilities rounded to 16 bits once, for the PV product as there and for the backward (which reads them instead
of float32 ones: the attention a sixth faster); measured in benchmarks/vs_pytorch.py (docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def row_major_swap(x: Array, a: int, b: int) -> Array:
    """x with axes a < b swapped, as a row-major copy. A plain transpose would become a layout change that XLA folds
    into the consuming dot (a transposed operand: the slow float32 path); through a unit axis it stays a copy."""
    y = jnp.expand_dims(x, b + 1)
    perm = list(range(y.ndim))
    perm[a], perm[b] = b, a
    shape = list(x.shape)
    shape[a], shape[b] = shape[b], shape[a]
    return jnp.transpose(y, perm).reshape(shape)


def _batched_dot(lhs: Array, rhs: Array) -> Array:
    """[B, H, m, k] . [B, H, k, n] -> [B, H, m, n] float32."""
    return jax.lax.dot_general(lhs, rhs, (((3,), (2,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)


def _forward(q: Array, k: Array, v: Array, mask: Array | None) -> tuple[Array, tuple]:
    scores = _batched_dot(q, row_major_swap(k, 2, 3)) * q.shape[-1] ** -0.5  # [B, H, Lq, Lk]
    if mask is not None:
        scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # kept in 16 bits for the backward too
    return _batched_dot(probs, v).astype(q.dtype), (q, k, v, probs)


@jax.custom_vjp
def _head_major_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """q [B, H, Lq, D], k/v [B, H, Lk, D] (16-bit), mask [Lq, Lk] bool or None -> [B, H, Lq, D]."""
    return _forward(q, k, v, mask)[0]


def _backward(saved: tuple, d_out: Array) -> tuple[Array, Array, Array, None]:
    """dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)) / sqrt(d), dQ = dS K, dK = dS^T Q; dV and dK as
    (dO^T P)^T and (Q^T dS)^T, so only the [L, D] operands need transposed copies, never the [L, L] ones."""
    q, k, v, probs = saved
    d_out = d_out.astype(q.dtype)
    d_v = _batched_dot(row_major_swap(d_out, 2, 3), probs)  # [B, H, D, Lk]
    probs = probs.astype(jnp.float32)
    d_probs = _batched_dot(d_out, row_major_swap(v, 2, 3))
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)) * q.shape[-1] ** -0.5
    d_scores = d_scores.astype(q.dtype)  # masked pairs have probs 0, so 0 here
    d_q = _batched_dot(d_scores, k).astype(q.dtype)
    d_k = _batched_dot(row_major_swap(q, 2, 3), d_scores)  # [B, H, D, Lk]
    to_rows = lambda x, like: row_major_swap(x, 2, 3).astype(like.dtype)  # noqa: E731
    return d_q, to_rows(d_k, k), to_rows(d_v, v), None


_head_major_attention.defvjp(_forward, _backward)


def attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
    """softmax(q k^T / sqrt(d), masked) v for 16-bit q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D];
    `mask` [Lq, Lk] bool (True: attended) or None."""
    out = _head_major_attention(row_major_swap(q, 1, 2), row_major_swap(k, 1, 2), row_major_swap(v, 1, 2), mask)
    return row_major_swap(out, 1, 2)
