"""Plain-jnp attention: the reference every kernel is tested against, and the `xla` implementation."""

import jax
import jax.numpy as jnp

MASK_MODES = ("full", "causal", "block_causal", "bd3_train")


def attention_bias_mask(mode: str, q_len: int, kv_len: int, block_size: int = 1) -> jax.Array | None:
    """Boolean [q_len, kv_len] mask of allowed (query, key) pairs for `mode`, or None when all are allowed.

    block_causal: block(j) <= block(i), block(x) = x // block_size. bd3_train (BD3-LM's vectorized training over
    [x_t ; x_0], length 2L): noisy -> noisy within the same block, noisy -> clean in strictly earlier blocks,
    clean -> clean block-causally, clean -> noisy never.
    """
    i, j = jnp.arange(q_len)[:, None], jnp.arange(kv_len)[None, :]
    if mode == "full":
        return None
    if mode == "causal":
        return i >= j
    if mode == "block_causal":
        return j // block_size <= i // block_size
    if mode == "bd3_train":
        half = q_len // 2
        q_noisy, k_noisy = i < half, j < half
        q_block, k_block = jnp.where(q_noisy, i, i - half) // block_size, jnp.where(k_noisy, j, j - half) // block_size
        return ((q_noisy & k_noisy & (q_block == k_block)) | (q_noisy & ~k_noisy & (k_block < q_block))
                | (~q_noisy & ~k_noisy & (k_block <= q_block)))
    raise ValueError(f"unknown attention mask mode {mode!r}; choose one of {MASK_MODES}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str = "full", block_size: int = 1) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v, with the softmax in float32.

    q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = attention_bias_mask(mask_mode, q.shape[1], k.shape[1], block_size)
    if mask is not None:
        scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     cache_len: jax.Array, block_mask_mode: str = "full") -> jax.Array:
    """A block of queries against a KV cache of valid length `cache_len` plus the block itself.

    q/k/v: [B, Lb, H, D] (the block); k_cache/v_cache: [B, Lmax, H, D], only [:cache_len] is read.
    Inside the block the mask is `block_mask_mode` (full: bidirectional, block diffusion; causal: AR).
    Fixed shapes, so it runs inside `lax.scan`. -> [B, Lb, H, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    neg = jnp.finfo(jnp.float32).min
    s_cache = jnp.einsum("bqhd,bkhd->bhqk", q, k_cache, preferred_element_type=jnp.float32) * scale
    s_cache = jnp.where((jnp.arange(k_cache.shape[1]) < cache_len)[None, None, None, :], s_cache, neg)
    s_block = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = attention_bias_mask(block_mask_mode, q.shape[1], k.shape[1])
    if mask is not None:
        s_block = jnp.where(mask[None, None], s_block, neg)
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_block], axis=-1), axis=-1).astype(v.dtype)
    p_cache, p_block = probs[..., : k_cache.shape[1]], probs[..., k_cache.shape[1] :]
    return jnp.einsum("bhqk,bkhd->bqhd", p_cache, v_cache) + jnp.einsum("bhqk,bkhd->bqhd", p_block, v)
