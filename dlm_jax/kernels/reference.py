"""Plain-jnp attention: the reference every kernel is tested against, and the `xla` implementation.

Mask modes (`allowed(mode, i, j, ...)` is the single definition; the Pallas kernels evaluate the same function on
tile indices, splash attention on a numpy grid):
  full          every pair.
  causal        j <= i.
  block_causal  block(j) <= block(i), block(x) = x // block_size (block diffusion over a whole sequence).
  bd3_train     BD3-LM training over [x_t ; x_0] (q_len = kv_len = 2L; index x < L is noisy token x, x >= L is clean
                token x - L): noisy->noisy same block; noisy->clean block(j - L) < block(i) (strictly earlier
                blocks); clean->noisy never; clean->clean block(j - L) <= block(i - L).
An explicit boolean `mask` [Lq, Lk] (the xla path only) further restricts a mode's pairs: `anneal_mask` builds
DiffuLLaMA's causal-to-full annealed mask with it.
"""

import jax
import jax.numpy as jnp

MASK_MODES = ("full", "causal", "block_causal", "bd3_train")
BLOCK_MASK_MODES = ("full", "causal")  # inside a decoded block (cached attention)


def check_mask_mode(mode: str, kv_len: int, block_size: int, modes: tuple[str, ...] = MASK_MODES) -> None:
    """ValueError for an unknown mode, a bad block size, or a bd3_train sequence of odd length."""
    if mode not in modes:
        raise ValueError(f"unknown attention mask mode {mode!r}; choose one of {modes}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if mode == "bd3_train" and kv_len % 2:
        raise ValueError(f"bd3_train attends over [x_t ; x_0], so its length must be even, got {kv_len}")


def allowed(mode: str, i, j, block_size: int = 1, kv_len: int = 0):
    """Whether query index `i` may attend to key index `j` (arrays that broadcast: numpy, jnp, or in-kernel values).

    Only operators are used, so the same code runs in numpy, jnp and inside a Pallas kernel. `kv_len` (static) is
    needed by bd3_train only (half = kv_len // 2). Returns None for `full` (no mask).
    """
    if mode == "full":
        return None
    if mode == "causal":
        return j <= i
    if mode == "block_causal":
        return j // block_size <= i // block_size
    if mode == "bd3_train":
        half = kv_len // 2
        q_noisy, k_noisy = i < half, j < half
        bq, bk = (i % half) // block_size, (j % half) // block_size
        same = bk == bq
        return ((q_noisy & k_noisy & same) | (q_noisy & ~k_noisy & (bk < bq))
                | (~q_noisy & ~k_noisy & (bk <= bq)))
    raise ValueError(f"unknown attention mask mode {mode!r}; choose one of {MASK_MODES}")


def attention_bias_mask(mode: str, q_len: int, kv_len: int, block_size: int = 1) -> jax.Array | None:
    """Boolean [q_len, kv_len] mask of allowed (query, key) pairs for `mode`, or None when all are allowed."""
    check_mask_mode(mode, kv_len, block_size)
    return allowed(mode, jnp.arange(q_len)[:, None], jnp.arange(kv_len)[None, :], block_size, kv_len)


def combined_mask(mode: str, q_len: int, kv_len: int, block_size: int = 1,
                  mask: jax.Array | None = None) -> jax.Array | None:
    """The mode's [Lq, Lk] bool mask AND an explicit one (either may be None; None: every pair attended)."""
    mode_mask = attention_bias_mask(mode, q_len, kv_len, block_size)
    if mode_mask is None or mask is None:
        return mask if mode_mask is None else mode_mask
    return mask & mode_mask


def anneal_mask(rng: jax.Array, ratio: jax.Array, length: int) -> jax.Array:
    """DiffuLLaMA's attention-mask annealing (Gong et al. 2024): causal OR each other (query, key) pair allowed
    with prob `ratio` in [0, 1] (0: causal, 1: full); one draw [length, length] bool shared by batch and heads."""
    rows, cols = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    return allowed("causal", rows, cols) | (jax.random.uniform(rng, (length, length)) < ratio)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_mode: str = "full", block_size: int = 1,
              mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v, with the softmax in float32.

    q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype. `mask` [Lq, Lk] bool: only these pairs
    (and the mode's) are attended.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = combined_mask(mask_mode, q.shape[1], k.shape[1], block_size, mask)
    if mask is not None:
        scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     cache_len: jax.Array, block_mask_mode: str = "full") -> jax.Array:
    """A block of queries against a KV cache of valid length `cache_len` plus the block itself.

    q/k/v: [B, Lb, H, D] (the block); k_cache/v_cache: [B, Lmax, H, D], only [:cache_len] is read.
    Inside the block the mask is `block_mask_mode` (full: bidirectional, block diffusion; causal: AR).
    Fixed shapes, so it runs inside `lax.scan`. -> [B, Lb, H, D] in q's dtype.
    """
    check_mask_mode(block_mask_mode, k.shape[1], 1, BLOCK_MASK_MODES)
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
    out = jnp.einsum("bhqk,bkhd->bqhd", p_cache, v_cache) + jnp.einsum("bhqk,bkhd->bqhd", p_block, v)
    return out.astype(q.dtype)
