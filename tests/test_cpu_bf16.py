"""16-bit training on CPU (kernels/cpu_bf16.py, models/matmul.py): the reference math, with every dot of the forward
and the backward on bf16 operands (the XLA:CPU kernels that make bf16 faster than float32)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.kernels import attention as attention_lib
from dlm_jax.kernels import cpu_bf16, reference
from dlm_jax.models.matmul import dot_f32_accumulate
from dlm_jax.train.loop import train
from dlm_jax.train.metrics import read_metrics
from tests.helpers import tiny_config

MODES = [("full", 1), ("causal", 1), ("block_causal", 4), ("bd3_train", 4)]


def _bf16(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32)).astype(jnp.bfloat16)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _dot_operand_dtypes(fn, *args) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in the compiled HLO of fn(*args) (instruction names are unique)."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    dtypes = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    return [(dtypes[a], dtypes[b]) for a, b in re.findall(r"\bdot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


def test_row_major_swap_is_a_transpose():
    x = jnp.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3), (1, 3)]:
        np.testing.assert_array_equal(cpu_bf16.row_major_swap(x, a, b), jnp.swapaxes(x, a, b))


@pytest.mark.parametrize("mode,block_size", MODES + [("anneal", 1), ("cross", 1)])
def test_attention_and_its_gradients_match_the_reference(mode, block_size):
    """Forward and all three gradients against reference.attention in float32 on the same bf16 values."""
    kv_len = 24 if mode == "cross" else 16
    q, k, v = _bf16((2, 16, 2, 8), 0), _bf16((2, kv_len, 2, 8), 1), _bf16((2, kv_len, 2, 8), 2)
    weights = _bf16(q.shape, 3).astype(jnp.float32)
    mask = reference.anneal_mask(jax.random.PRNGKey(0), 0.5, 16) if mode == "anneal" else None
    mode = "full" if mode in ("anneal", "cross") else mode
    combined = reference.combined_mask(mode, 16, kv_len, block_size, mask)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    got = cpu_bf16.attention
    want = lambda q, k, v: reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), mode,  # noqa: E731
                                               block_size, mask)
    out = jax.jit(lambda q, k, v: got(q, k, v, combined))(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    assert _rel_err(out, want(q, k, v)) < 1e-2
    grads = jax.jit(jax.grad(loss(lambda q, k, v: got(q, k, v, combined)), (0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(want), (0, 1, 2)))(q, k, v)
    for g, e in zip(grads, expected, strict=True):
        assert g.dtype == jnp.bfloat16 and g.shape == e.shape
        assert _rel_err(g, e) < 2e-2


def test_the_dispatcher_sends_16_bit_cpu_attention_here_and_float32_to_the_reference():
    q, k, v = _bf16((2, 16, 2, 8), 4), _bf16((2, 16, 2, 8), 5), _bf16((2, 16, 2, 8), 6)
    mask = reference.attention_bias_mask("bd3_train", 16, 16, 4)
    np.testing.assert_array_equal(attention_lib.attention(q, k, v, "bd3_train", "xla", 4),
                                  cpu_bf16.attention(q, k, v, mask))
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    np.testing.assert_array_equal(attention_lib.attention(q32, k32, v32, "bd3_train", "auto", 4),
                                  reference.attention(q32, k32, v32, "bd3_train", 4))


def test_every_dot_of_the_16_bit_train_step_pieces_takes_bf16_operands():
    """XLA:CPU converts a bf16 dot it has no fast kernel for (a transposed operand) to float32; these layouts must
    keep every dot, forward and backward, in bf16 (benchmarks/vs_pytorch.py measures what that is worth)."""
    q, k, v = _bf16((2, 32, 2, 16), 7), _bf16((2, 32, 2, 16), 8), _bf16((2, 32, 2, 16), 9)
    mask = reference.attention_bias_mask("causal", 32, 32)
    attention_grads = jax.grad(lambda q, k, v: jnp.sum(cpu_bf16.attention(q, k, v, mask).astype(jnp.float32) ** 2),
                               (0, 1, 2))
    rows, kernel = _bf16((64, 4, 16), 10), _bf16((4, 16, 32), 11).astype(jnp.float32)  # [N, H, D] . [H, D, E]
    matmul_grads = jax.grad(lambda x, w: jnp.sum(dot_f32_accumulate(x, w, (((1, 2), (0, 1)), ((), ()))).astype(
        jnp.float32) ** 2), (0, 1))
    for fn, args, count in [(attention_grads, (q, k, v), 6), (matmul_grads, (rows, kernel), 3)]:
        dtypes = _dot_operand_dtypes(fn, *args)
        assert len(dtypes) == count and all(d == ("bf16", "bf16") for d in dtypes), dtypes


@pytest.mark.parametrize("family,extra", [("mdlm", []), ("block", ["--config.block.block_size=4"]), ("ar", [])])
def test_16_bit_training_on_8_devices_follows_float32(tmp_path, train_corpus, family, extra):
    """A few sharded steps in bf16 (full, bd3_train and causal attention; every weight matmul) stay within bf16
    rounding of the same float32 run."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        workdir = str(tmp_path / dtype)
        train(tiny_config(train_corpus, family, ["--config.train.num_steps=4", f"--config.model.dtype={dtype}"]
                          + extra), workdir)
        losses[dtype] = [m["loss"] for m in read_metrics(workdir) if "loss" in m]
    assert len(losses["bfloat16"]) == 4 and np.all(np.isfinite(losses["bfloat16"]))
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
