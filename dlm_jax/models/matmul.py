"""The weight matmuls of the backbone, shaped for speed on every backend with the same math.

`on_rows` merges the leading [B, L] axes into one row axis before a weight's matmul (XLA:CPU otherwise copies a
transposed [B, L, ...] operand in the backward pass); `dot_f32_accumulate` keeps float32 (and GPU / TPU) unchanged
and, in bfloat16 on CPU, accumulates every product in float32 with row-major operands (XLA:CPU runs the CPU's bf16
dot instructions only then, kernels/cpu_bf16.py).
Measured in benchmarks/vs_pytorch.py (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dlm_jax.kernels.cpu_bf16 import row_major_swap

Array = jax.Array


def _accumulate_f32(lhs: Array, rhs: Array, dims: Any) -> Array:
    return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32).astype(lhs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_dot(lhs: Array, rhs: Array, n_in: int) -> Array:
    """lhs [N, *in] . rhs [*in, *out] -> [N, *out], each product (forward and both gradients) on low-precision
    operands accumulated in float32 (autodiff alone would hand the gradient dots a float32 cotangent)."""
    return _accumulate_f32(lhs, rhs, ((tuple(range(1, 1 + n_in)), tuple(range(n_in))), ((), ())))


def _low_precision_dot_fwd(lhs: Array, rhs: Array, n_in: int) -> tuple[Array, tuple[Array, Array]]:
    return _low_precision_dot(lhs, rhs, n_in), (lhs, rhs)


def _low_precision_dot_bwd(n_in: int, saved: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    lhs, rhs = saved
    g = g.astype(lhs.dtype)
    out_dims = tuple(range(n_in, rhs.ndim))
    d_lhs = _accumulate_f32(g, rhs, ((tuple(range(1, 1 + len(out_dims))), out_dims), ((), ())))
    rows = lhs.shape[0]  # the weight gradient as a [K, N] . [N, out] product: lhs^T must be a real row-major copy
    d_rhs = _accumulate_f32(row_major_swap(lhs.reshape(rows, -1), 0, 1), g.reshape(rows, -1), (((1,), (0,)), ((), ())))
    return d_lhs, d_rhs.reshape(rhs.shape).astype(rhs.dtype)


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


def dot_f32_accumulate(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                       preferred_element_type: Any = None) -> Array:
    """lax.dot_general for the weight matmuls (rows [N, *in] . kernel [*in, *out]): unchanged in float32 and on
    GPU / TPU (their bf16 dots accumulate in float32 already); in bfloat16 on CPU every product accumulates in float32
    and returns bfloat16, forward and backward (XLA:CPU runs the CPU's bf16 dot instructions only for a float32
    result: 2x its bf16 -> bf16 matmul, benchmarks/vs_pytorch.py)."""
    del preferred_element_type
    (lhs_contract, rhs_contract), batch = dimension_numbers
    n_in = len(lhs_contract)
    rows_by_kernel = (lhs.ndim == 1 + n_in and tuple(lhs_contract) == tuple(range(1, 1 + n_in))
                      and tuple(rhs_contract) == tuple(range(n_in)) and not any(batch))
    if lhs.dtype == jnp.float32 or not rows_by_kernel or jax.default_backend() != "cpu":  # GPU / TPU: as before
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)
    return _low_precision_dot(lhs, rhs.astype(lhs.dtype), n_in)


def on_rows(fn: Any, x: Array, n_in: int = 1) -> Array:
    """fn applied to x [..., *in] (the last n_in axes) with every leading axis merged into one row axis, the result
    reshaped back: XLA:CPU runs a weight's matmuls on [rows, in] operands without the transposed copies it makes of
    [B, L, ...] ones in the backward pass (benchmarks/vs_pytorch.py); the same math."""
    lead = x.shape[:x.ndim - n_in]
    out = fn(x.reshape((-1,) + x.shape[x.ndim - n_in:]))
    return out.reshape(lead + out.shape[1:])
