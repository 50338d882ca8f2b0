"""The backbone's weight matmuls (models/matmul.py): the same math as lax.dot_general, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.models.matmul import dot_f32_accumulate, on_rows

DIMS = (((1, 2), (0, 1)), ((), ()))  # rows [N, H, D] . kernel [H, D, E]


def _operands():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return jax.random.normal(k1, (6, 2, 3)), jax.random.normal(k2, (2, 3, 4))


def test_float32_is_exactly_dot_general_and_on_rows_is_the_same_contraction():
    x, w = _operands()
    np.testing.assert_array_equal(dot_f32_accumulate(x, w, DIMS), jax.lax.dot_general(x, w, DIMS))
    x3 = x.reshape(2, 3, 2, 3)  # [B, L, H, D]
    rows = on_rows(lambda r: dot_f32_accumulate(r, w, DIMS), x3, n_in=2)
    assert rows.shape == (2, 3, 4)
    np.testing.assert_allclose(rows, jnp.einsum("blhd,hde->ble", x3, w), rtol=1e-6, atol=1e-6)


def test_bfloat16_forward_and_gradients_match_the_float32_math():
    x, w = _operands()

    def loss(fn, x, w):
        return (fn(x, w).astype(jnp.float32) ** 2).sum()

    low = lambda x, w: dot_f32_accumulate(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), DIMS)  # noqa: E731
    ref = lambda x, w: jax.lax.dot_general(x, w, DIMS)  # noqa: E731
    out = low(x, w)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref(x, w), rtol=3e-2, atol=3e-2)
    grads, expected = jax.grad(lambda x, w: loss(low, x, w), (0, 1))(x, w), jax.grad(
        lambda x, w: loss(ref, x, w), (0, 1))(x, w)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * float(jnp.abs(want).max()))
