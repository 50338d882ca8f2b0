"""Attention kernels: masks by hand, Pallas kernels (interpret mode) and splash against the reference, dispatcher."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.kernels import attention as attention_lib
from dlm_jax.kernels import pallas_cached, pallas_flash, reference, splash

# relative error bound (Frobenius) of a kernel vs the reference computed in the same dtype
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# the reference jitted: one compile per shape instead of one per eager op
ref_attention = jax.jit(reference.attention, static_argnums=(3, 4))
ref_cached = jax.jit(reference.cached_attention, static_argnums=(6,))
MODES = [("full", 1), ("causal", 1), ("block_causal", 4), ("bd3_train", 4)]


def _rand(shape, seed, dtype=jnp.float32):
    """Fresh standard-normal inputs (numpy: no per-shape compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32).astype(dtype))


def _qkv(batch, length, heads, dim, dtype=jnp.float32, seed=0, kv_length=None):
    kv_length = kv_length or length
    return (_rand((batch, length, heads, dim), seed, dtype), _rand((batch, kv_length, heads, dim), seed + 1, dtype),
            _rand((batch, kv_length, heads, dim), seed + 2, dtype))


def _assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err < RTOL[dtype], err


def _mask(mode, length, block_size):
    return np.asarray(reference.attention_bias_mask(mode, length, length, block_size)).astype(int)


# ---------------------------------------------------------------------------------------------------- masks


def test_masks_by_hand():
    assert reference.attention_bias_mask("full", 4, 4) is None
    np.testing.assert_array_equal(_mask("causal", 3, 1), [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(_mask("block_causal", 4, 2), [[1, 1, 0, 0], [1, 1, 0, 0],
                                                                 [1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(_mask("block_causal", 4, 1), _mask("causal", 4, 1))


def test_bd3_train_mask_by_hand():
    # [x_t ; x_0] with L = 4, block 2: rows/cols 0-3 noisy (blocks 0 0 1 1), 4-7 clean (blocks 0 0 1 1)
    expected = [
        [1, 1, 0, 0, 0, 0, 0, 0],  # noisy block 0: its own block only (no earlier clean block)
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # noisy block 1: its own block + clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # clean block 0: clean block 0 (never noisy)
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],  # clean block 1: clean blocks 0, 1
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    np.testing.assert_array_equal(_mask("bd3_train", 8, 2), expected)


def test_masks_reject_bad_arguments():
    with pytest.raises(ValueError, match="block_causal"):
        reference.attention_bias_mask("sliding", 4, 4)
    with pytest.raises(ValueError, match="even"):
        reference.attention_bias_mask("bd3_train", 5, 5, 1)
    with pytest.raises(ValueError, match="block_size"):
        reference.attention_bias_mask("block_causal", 4, 4, 0)


@pytest.mark.parametrize("mode,block_size,length,tile", [("causal", 1, 40, 16), ("block_causal", 6, 40, 16),
                                                         ("bd3_train", 3, 36, 16), ("bd3_train", 4, 64, 8)])
def test_kv_ranges_cover_mask_and_skip(mode, block_size, length, tile):
    """Every allowed key of a query tile lies in the tile's KV ranges; the ranges skip what they should."""
    mask = np.asarray(reference.attention_bias_mask(mode, length, length, block_size))
    visited = _check_tile_ranges(pallas_flash._kv_ranges, mask, mode, block_size, tile)
    assert visited < mask.shape[0] * mask.shape[1] / 2 + length * tile  # about the mask's density


@pytest.mark.parametrize("mode,block_size,length,tile", [("full", 1, 40, 16), ("causal", 1, 40, 16),
                                                         ("block_causal", 6, 40, 16), ("bd3_train", 3, 36, 16),
                                                         ("bd3_train", 4, 64, 8), ("bd3_train", 8, 64, 16)])
def test_q_ranges_cover_mask_and_skip(mode, block_size, length, tile):
    """Every query that may see a key of a KV tile lies in the tile's query ranges (the backward's dk / dv loop)."""
    m = reference.attention_bias_mask(mode, length, length, block_size)
    mask = np.broadcast_to(True if m is None else np.asarray(m), (length, length))
    visited = _check_tile_ranges(pallas_flash._q_ranges, mask.T, mode, block_size, tile)
    assert visited <= mask.sum() + 2 * length * tile  # about the mask's density


def _check_tile_ranges(ranges_fn, mask, mode, block_size, tile) -> int:
    """For every tile [lo, hi) of mask's rows: the columns it needs (mask[lo:hi]) lie in ranges_fn's ranges;
    returns the number of columns visited over all tiles."""
    length = mask.shape[0]
    visited = 0
    for lo in range(0, length, tile):
        hi = min(lo + tile, length)
        covered = np.zeros(length, bool)
        for a, b in ranges_fn(mode, jnp.int32(lo), jnp.int32(hi), block_size, length):
            covered[int(a):max(int(a), int(b))] = True
        assert not np.any(mask[lo:hi] & ~covered), (lo, covered)
        visited += covered.sum()
    return visited


# ---------------------------------------------------------------------------------------------------- flash


@functools.cache
def _flash(mode, block_size, block_q, block_k):
    return jax.jit(lambda q, k, v: pallas_flash.flash_attention(q, k, v, mode, block_size, block_q, block_k,
                                                                    interpret=True))


@pytest.mark.parametrize("mode,block_size,dtype", [(m, b, jnp.float32) for m, b in MODES] + [
    ("bd3_train", 4, jnp.bfloat16)])
def test_flash_matches_reference(mode, block_size, dtype):
    q, k, v = _qkv(2, 40, 2, 8, dtype)  # 40 pads to 48: three 16-tiles, padded keys and rows; D 8 pads to 16
    _assert_close(_flash(mode, block_size, 16, 16)(q, k, v), ref_attention(q, k, v, mode, block_size), dtype)


@pytest.mark.parametrize("mode,block_size,shape,block_q,block_k", [
    ("bd3_train", 3, (1, 36, 3, 24), 32, 16),  # blocks straddle tiles and the x_t / x_0 halves
    ("bd3_train", 8, (2, 64, 1, 16), 16, 32),  # no padding, block_q < block_k
    ("block_causal", 8, (1, 64, 2, 32), 32, 16),
    ("causal", 1, (2, 8, 2, 16), 128, 64),  # one tile clamped to the length (then to the 16 minimum)
    ("full", 1, (1, 24, 2, 16, 40), 16, 16),  # cross-attention lengths (q 24, kv 40)
])
def test_flash_shapes(mode, block_size, shape, block_q, block_k):
    q, k, v = _qkv(*shape[:4], seed=3, kv_length=shape[4] if len(shape) > 4 else None)
    out = _flash(mode, block_size, block_q, block_k)(q, k, v)
    _assert_close(out, ref_attention(q, k, v, mode, block_size), jnp.float32)


def _grads(fn, q, k, v, w):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))(
        q, k, v)


@pytest.mark.parametrize("mode,block_size", MODES)
def test_flash_gradients_match_reference(mode, block_size):
    """The Pallas backward (dq and dk/dv kernels) through the dispatcher, as training calls it."""
    q, k, v = _qkv(2, 24, 2, 8, seed=7)
    w = _rand(q.shape, 11)
    got = _grads(lambda q, k, v: attention_lib.attention(q, k, v, mode, "pallas_interpret", block_size), q, k, v, w)
    want = _grads(lambda q, k, v: ref_attention(q, k, v, mode, block_size), q, k, v, w)
    for g, r in zip(got, want, strict=True):
        _assert_close(g, r, jnp.float32)


@pytest.mark.parametrize("mode,block_size,shape,bwd_block", [
    ("bd3_train", 3, (1, 36, 2, 24), 16),  # blocks straddle tiles and the halves; rows, keys and D padded
    ("block_causal", 6, (2, 40, 1, 8), 16),
    ("causal", 1, (1, 40, 2, 8), 32),
    ("full", 1, (1, 24, 2, 16, 40), 16),  # cross-attention lengths (q 24, kv 40)
])
def test_flash_backward_shapes(mode, block_size, shape, bwd_block):
    """Several dq / dk-dv tiles, padding everywhere, backward tiles unlike the forward's."""
    q, k, v = _qkv(*shape[:4], seed=5, kv_length=shape[4] if len(shape) > 4 else None)
    w = _rand(q.shape, 9)
    got = _grads(lambda q, k, v: pallas_flash.flash_attention(q, k, v, mode, block_size, 32, 16, bwd_block,
                                                                  interpret=True), q, k, v, w)
    want = _grads(lambda q, k, v: ref_attention(q, k, v, mode, block_size), q, k, v, w)
    for g, r in zip(got, want, strict=True):
        _assert_close(g, r, jnp.float32)


# ---------------------------------------------------------------------------------------------------- cached


@pytest.mark.parametrize("block_mask_mode,block_len,max_len,dtype,splits", [
    ("causal", 1, 64, jnp.float32, 1),  # Lb = 1 (AR decoding)
    ("causal", 1, 64, jnp.float32, 3),  # 4 tiles over 3 splits: 2 + 2, the third split empty
    ("full", 5, 50, jnp.float32, 2), ("causal", 5, 50, jnp.float32, 4),  # Lb > 1, block and cache padded
    ("full", 4, 48, jnp.bfloat16, None),  # splits chosen for the device
])
def test_cached_matches_reference(block_mask_mode, block_len, max_len, dtype, splits):
    q, k, v = _qkv(2, block_len, 2, 8, dtype, seed=13)
    k_cache, v_cache = _rand((2, max_len, 2, 8), 17, dtype), _rand((2, max_len, 2, 8), 19, dtype)
    kernel = jax.jit(functools.partial(pallas_cached.cached_attention, block_mask_mode=block_mask_mode,
                                       block_k=16, num_splits=splits, interpret=True))
    for n in (0, max_len // 2 + 1, max_len):  # empty cache, a partial tile, full cache: one compile (n is traced)
        want = ref_cached(q, k, v, k_cache, v_cache, jnp.int32(n), block_mask_mode)
        _assert_close(kernel(q, k, v, k_cache, v_cache, jnp.int32(n)), want, dtype)


def test_cached_decoding_in_scan_matches_full_attention():
    """Blocks decoded one by one through the cache in `lax.scan` == block_causal attention over the sequence."""
    block, num_blocks = 4, 3
    q, k, v = _qkv(1, block * num_blocks, 2, 16, seed=23)

    def step(cache, b):
        start = b * block
        qb, kb, vb = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=1) for x in (q, k, v))
        out = attention_lib.cached_attention(qb, kb, vb, cache[0], cache[1], start, "full", "pallas_interpret")
        cache = tuple(jax.lax.dynamic_update_slice_in_dim(c, x, start, axis=1)
                      for c, x in zip(cache, (kb, vb), strict=True))
        return cache, out

    empty = (jnp.zeros_like(k), jnp.zeros_like(v))
    _, outs = jax.jit(lambda: jax.lax.scan(step, empty, jnp.arange(num_blocks)))()
    outs = jnp.concatenate(list(outs), axis=1)
    _assert_close(outs, ref_attention(q, k, v, "block_causal", block), jnp.float32)


# ---------------------------------------------------------------------------------------------------- splash (TPU)


def test_splash_mask_matches_reference_with_padding():
    mask = splash.splash_mask("bd3_train", 10, 16, 2).array
    np.testing.assert_array_equal(mask[:10, :10], _mask("bd3_train", 10, 2).astype(bool))
    assert not mask[:10, 10:].any()  # padded keys are never seen by real queries
    assert mask[10:, :10].all() and not mask[10:, 10:].any()  # padded queries see real keys only (no NaN rows)


@pytest.mark.parametrize("mode,block_size,length", [("block_causal", 4, 100)])  # bd3_train: the gradient test
def test_splash_interpret_matches_reference(mode, block_size, length):
    q, k, v = _qkv(1, length, 2, 32, seed=29)
    out = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, mode, block_size, interpret=True))(
        q, k, v)
    _assert_close(out, ref_attention(q, k, v, mode, block_size), jnp.float32)


def test_splash_interpret_gradients():
    q, k, v = _qkv(1, 128, 1, 32, seed=31)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))(q, k, v)

    got = grads(lambda q, k, v: splash.splash_attention(q, k, v, "bd3_train", 8, interpret=True))
    want = grads(lambda q, k, v: ref_attention(q, k, v, "bd3_train", 8))
    for g, r in zip(got, want, strict=True):
        _assert_close(g, r, jnp.float32)


# ---------------------------------------------------------------------------------------------------- dispatcher


def test_dispatcher_resolves_and_rejects():
    assert jax.default_backend() == "cpu"
    assert attention_lib.resolve_impl("auto") == "xla"
    assert attention_lib.resolve_impl("pallas_interpret") == "pallas_interpret"
    with pytest.raises(ValueError, match="pallas_interpret"):
        attention_lib.resolve_impl("triton")
    with pytest.raises(ValueError, match="GPU or TPU"):
        attention_lib.resolve_impl("pallas")
    q, k, v = _qkv(1, 8, 1, 16)
    with pytest.raises(ValueError, match="bd3_train"):
        attention_lib.attention(q, k, v, mask_mode="sliding")
    with pytest.raises(ValueError, match="causal"):
        attention_lib.cached_attention(q, k, v, k, v, 0, block_mask_mode="block_causal")


def test_auto_table_is_well_formed():
    """Every AUTO entry names a real backend op, mask mode and concrete impl, in increasing length."""
    for (backend, op), modes in attention_lib.AUTO.items():
        assert backend in ("gpu", "tpu") and op in ("attention", "cached")
        for mode, entries in modes.items():
            assert mode in (reference.MASK_MODES if op == "attention" else reference.BLOCK_MASK_MODES)
            assert [t for t, _ in entries] == sorted({t for t, _ in entries})
            assert all(impl in ("xla", "pallas", "cudnn") for _, impl in entries)
            assert op == "attention" or all(impl != "cudnn" for _, impl in entries)


def test_auto_follows_the_measured_table(monkeypatch):
    """`auto` picks what AUTO lists for (backend, op, mode) at or above its length for 16-bit inputs (the timed
    dtype; float32 stays on xla); explicit choices are kept or refused with a reason."""
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention_lib, "AUTO", {
        ("gpu", "attention"): {"causal": [(512, "pallas"), (2048, "cudnn")], "bd3_train": [(1024, "pallas")]},
        ("gpu", "cached"): {"full": [(1024, "pallas")]}})
    resolve = attention_lib.resolve_impl
    assert resolve("auto", "attention", "causal", 4096, jnp.bfloat16) == "cudnn"
    assert resolve("auto", "attention", "causal", 4096, jnp.float32) == "xla"  # timed in bf16 only
    assert resolve("auto", "attention", "causal", 1024) == "pallas"
    assert resolve("auto", "attention", "causal", 256) == "xla"
    assert resolve("auto", "attention", "bd3_train", 1024) == "pallas"
    assert resolve("auto", "attention", "full", 8192) == "xla"  # mode not listed
    assert resolve("auto", "attention", "bd3_train", 512) == "xla"
    assert resolve("auto", "cached", "full", 1024) == "pallas"
    assert resolve("auto", "cached", "causal", 8192) == "xla"
    assert resolve("cudnn", "cached", "full", 4096) == "pallas"  # cached decoding has no cuDNN path: auto
    assert resolve("auto", "cached", "full", 4096, jnp.float32) == "xla"
    assert resolve("xla", "attention", "causal", 8192) == "xla"
    with pytest.raises(ValueError, match="bfloat16"):
        resolve("cudnn", "attention", "causal", 8192, jnp.float32)
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "tpu")
    assert resolve("auto", "attention", "causal", 8192) == "xla"  # other backends have their own entries
    with pytest.raises(ValueError, match="NVIDIA"):
        resolve("cudnn", "attention", "causal", 8192)
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "cpu")
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve("cudnn")


def test_dispatcher_impls_agree():
    q, k, v = _qkv(2, 16, 2, 16, seed=37)
    run = jax.jit(attention_lib.attention, static_argnums=(3, 4, 5))
    xla = run(q, k, v, "bd3_train", "auto", 2)
    _assert_close(xla, ref_attention(q, k, v, "bd3_train", 2), jnp.float32)
    _assert_close(run(q, k, v, "bd3_train", "pallas_interpret", 2), xla, jnp.float32)


def test_lowers_for_gpu_and_tpu():
    """Without the hardware: the Triton (GPU) and Mosaic (TPU splash) lowerings of every kernel succeed."""
    export = pytest.importorskip("jax.export")
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
              export.DisabledSafetyCheck.custom_call("tpu_custom_call")]
    block = [jax.ShapeDtypeStruct((2, 24, 2, 64), jnp.bfloat16)] * 3
    seq = [jax.ShapeDtypeStruct((2, 200, 2, 64), jnp.bfloat16)] * 3
    cache = [jax.ShapeDtypeStruct((2, 1000, 2, 64), jnp.bfloat16)] * 2 + [jax.ShapeDtypeStruct((), jnp.int32)]
    lowered = [
        ("cuda", lambda q, k, v: pallas_flash.flash_attention(q, k, v, "bd3_train", 16), seq),
        *[("cuda", jax.grad(lambda q, k, v, m=m, b=b: jnp.sum(pallas_flash.flash_attention(q, k, v, m, b)),
                            argnums=(0, 1, 2)), seq) for m, b in MODES],
        ("cuda", functools.partial(pallas_cached.cached_attention, block_mask_mode="causal", num_splits=4),
         block + cache),
        ("tpu", lambda q, k, v: splash.splash_attention(q, k, v, "bd3_train", 16), seq),
    ]
    for platform, fn, args in lowered:
        module = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()
        assert "custom_call" in module


def test_transformer_through_pallas_interpret():
    """The backbone under bd3_train (block_size from its config) gives the same logits with the Pallas kernel."""
    import dataclasses

    from dlm_jax.models.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=11, num_layers=1, d_model=32, num_heads=2, mlp_dim=64, mask_mode="bd3_train",
                            block_size=4, scan_layers=False, attention_impl="xla")
    tokens = jnp.asarray(np.random.default_rng(41).integers(0, 11, (2, 16)), jnp.int32)
    positions = jnp.concatenate([jnp.arange(8), jnp.arange(8)])
    params = jax.jit(lambda: Transformer(cfg).init(jax.random.key(0), tokens, positions=positions)["params"])()
    rng = np.random.default_rng(43)  # the output head starts at zero: perturb every weight
    params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32), params)

    def logits(impl):
        model = Transformer(dataclasses.replace(cfg, attention_impl=impl))
        return jax.jit(lambda p: model.apply({"params": p}, tokens, positions=positions))(params)

    _assert_close(logits("pallas_interpret"), logits("xla"), jnp.float32)


# On the GPU, float32 dots may run as TF32 (Triton's and XLA's default), so the float32 bound is the TF32 one; the
# reference runs at the highest precision. A wrong mask or tile shows up as an error of order 1.
GPU_RTOL = {jnp.float32: 5e-3, jnp.bfloat16: 2e-2}


def _assert_close_gpu(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err < GPU_RTOL[dtype], err


def _assert_impl_matches_reference_on_gpu(impl, mode, block_size, dtype, q, k, v, w):
    """attention(impl) forward and its gradients vs the reference at the highest matmul precision."""
    fn = lambda q, k, v: attention_lib.attention(q, k, v, mode, impl, block_size)  # noqa: E731
    ref = lambda q, k, v: reference.attention(q, k, v, mode, block_size)  # noqa: E731
    got = (jax.jit(fn)(q, k, v), *_grads(fn, q, k, v, w))
    with jax.default_matmul_precision("highest"):
        want = (jax.jit(ref)(q, k, v), *_grads(ref, q, k, v, w))
    for g, r in zip(got, want, strict=True):
        _assert_close_gpu(g, r, dtype)


@pytest.mark.gpu_only
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode,block_size", [*MODES, ("block_causal", 16), ("bd3_train", 16)])
def test_pallas_gpu_attention_matches_reference(mode, block_size, dtype):
    """The compiled (not interpreted) flash kernels on a real GPU: forward and the backward's dq, dk, dv."""
    q, k, v = _qkv(2, 200, 4, 64, dtype)  # 200: padded rows and keys in the last tile
    _assert_impl_matches_reference_on_gpu("pallas", mode, block_size, dtype, q, k, v, _rand(q.shape, 3))


@pytest.mark.gpu_only
@pytest.mark.parametrize("mode,block_size", MODES)
def test_cudnn_attention_matches_reference(mode, block_size):
    """impl=cudnn (bf16): our masks through jax.nn.dot_product_attention on cuDNN, forward and gradients."""
    q, k, v = _qkv(2, 256, 4, 64, jnp.bfloat16, seed=5)
    _assert_impl_matches_reference_on_gpu("cudnn", mode, block_size, jnp.bfloat16, q, k, v, _rand(q.shape, 6))


@pytest.mark.gpu_only
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_mask_mode,block_len", [("full", 16), ("causal", 16), ("causal", 1)])
@pytest.mark.parametrize("batch", [1, 4])
def test_pallas_gpu_cached_matches_reference(block_mask_mode, block_len, dtype, batch):
    """The compiled split-KV cached kernel: cache length 0, partial (not a tile multiple) and full."""
    q, k, v = _qkv(batch, block_len, 4, 64, dtype, seed=7)
    k_cache, v_cache = _rand((batch, 1024, 4, 64), 9, dtype), _rand((batch, 1024, 4, 64), 10, dtype)
    kernel = jax.jit(lambda *a: attention_lib.cached_attention(*a, block_mask_mode=block_mask_mode, impl="pallas"))
    for n in (0, 300, 1024):
        got = kernel(q, k, v, k_cache, v_cache, jnp.int32(n))
        with jax.default_matmul_precision("highest"):
            want = ref_cached(q, k, v, k_cache, v_cache, jnp.int32(n), block_mask_mode)
        _assert_close_gpu(got, want, dtype)
