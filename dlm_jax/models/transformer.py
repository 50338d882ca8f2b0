"""The one backbone for every family: a pre-norm transformer with rotary positions and optional adaLN-zero.

DiT-style time conditioning (Peebles & Xie 2023, as used by MDLM): sinusoidal(t) -> MLP -> per-block
shift/scale/gate, zero-initialised so every block starts as the identity. Layers run under `nn.scan`
(one compiled block, params stacked on a leading `layers` axis) with optional remat. Weights carry
logical axis names; `dlm_jax/train/sharding.py` maps them to the device mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dlm_jax.config import DEFAULT_NORM_EPS
from dlm_jax.kernels import attention as attention_lib
from dlm_jax.models.features import apply_rotary, rotary_tables, timestep_embedding
from dlm_jax.models.matmul import dot_f32_accumulate, on_rows

Array = jax.Array
KVCache = dict[str, Array]  # {"key", "value"}: [num_layers, B, max_len, H, D] (one layer's slice inside a Block)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Static shape and numerics of the backbone (hashable, so it can live on a flax Module)."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_dim: int
    mask_mode: str = "full"  # full | causal | block_causal | bd3_train (kernels/reference.py)
    block_size: int = 1  # L' of the block masks
    mlp_type: str = "swiglu"
    norm: str = "rmsnorm"
    time_conditioning: bool = False
    cond_dim: int = 128
    dropout: float = 0.0
    rope_base: float = 10000.0
    positions: str = "rotary"  # rotary | learned (a table of max_positions rows added to the embeddings: GPT-2)
    max_positions: int = 0
    use_bias: bool = False  # biases on q/k/v/out, the MLP, layernorm and the head (GPT-2 weights)
    norm_eps: float = DEFAULT_NORM_EPS
    scan_layers: bool = True
    remat: str = "none"
    dtype: str = "float32"
    attention_impl: str = "auto"

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int, mask_mode: str,
                    block_size: int = 1) -> TransformerConfig:
        """The backbone of the `model` config section for a family's vocabulary, mask and block size."""
        given = ("vocab_size", "mask_mode", "block_size")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
        return cls(vocab_size=vocab_size, mask_mode=mask_mode, block_size=block_size, **{n: model[n] for n in names})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def dense_init(axes: tuple[str, ...], init=None):
    return nn.with_logical_partitioning(init or nn.initializers.lecun_normal(), axes)


def _constrain(x: Array, axes: tuple[str, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


class Norm(nn.Module):
    """RMSNorm or LayerNorm (weight-only, or with a bias), computed in float32."""

    kind: str
    eps: float = DEFAULT_NORM_EPS
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],))
        x = x * scale
        if self.use_bias:
            x = x + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (x.shape[-1],))
        return x.astype(dtype)


def backbone_norm(cfg: TransformerConfig, name: str) -> Norm:
    """The configured norm of the backbone (kind, eps, bias)."""
    return Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, name=name)


class Projection(nn.Module):
    """x [..., *in_shape] @ kernel [*in_shape, *out_shape]: a multi-axis Dense whose kernel keeps its shape.

    (flax's DenseGeneral initialises a flattened kernel, which breaks per-axis logical partitioning.)
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
        )
        kernel = self.param("kernel", dense_init(self.axes, init), self.in_shape + self.out_shape)
        contract = tuple(range(1, 1 + n_in))
        y = on_rows(lambda rows: dot_f32_accumulate(
            rows.astype(self.dtype), kernel.astype(self.dtype), ((contract, tuple(range(n_in))), ((), ()))), x, n_in)
        if not self.use_bias:
            return y
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]), self.out_shape)
        return y + bias.astype(self.dtype)


class Attention(nn.Module):
    """Self-attention; with a KV cache the block attends to cache[:cache_index] plus itself and returns the
    cache with its own K/V written at [cache_index, cache_index + L) (the caller keeps it or not)."""

    cfg: TransformerConfig
    mask_mode: str = "full"
    read_cache: bool = True  # False: the cache is known to be empty (index 0): skip reading it

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, cache: KVCache | None = None,
                 cache_index: Array | None = None, cache_len: Array | None = None, context: Array | None = None,
                 mask: Array | None = None) -> tuple[Array, KVCache | None]:
        """`context` [B, L, d_model] (no cache): cross-attention, keys and values from it at the same positions.
        `mask` [L, L] bool (no cache): only these pairs are attended (kernels/attention.py)."""
        cfg = self.cfg
        heads = (cfg.num_heads, cfg.head_dim)
        q, k, v = (
            Projection((cfg.d_model,), heads, ("embed", "heads", "kv"), cfg.compute_dtype, cfg.use_bias, name=n)(src)
            for n, src in (("query", x), ("key", x if context is None else context),
                           ("value", x if context is None else context))
        )  # [B, L, H, D]
        if cos is not None:  # None: learned positions, added to the embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = _constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
        if cache is None:
            out = attention_lib.attention(q, k, v, mask_mode=self.mask_mode, impl=cfg.attention_impl,
                                          block_size=cfg.block_size, mask=mask)
        else:  # inside a decoded block: causal for AR, bidirectional for diffusion
            block_mode = "causal" if cfg.mask_mode == "causal" else "full"
            if self.read_cache:
                k_cache, v_cache = cache["key"].astype(k.dtype), cache["value"].astype(v.dtype)
                out = attention_lib.cached_attention(
                    q, k, v, k_cache, v_cache, cache_index if cache_len is None else cache_len,
                    block_mask_mode=block_mode, impl=cfg.attention_impl)
            else:  # prefill / refresh at index 0: nothing cached yet (reading zeros only feeds constant folding)
                out = attention_lib.attention(q, k, v, mask_mode=block_mode, impl=cfg.attention_impl)
            if cache_len is None:  # an explicit valid length marks a read-only cache (Fast-dLLM dual cache)
                at = (0, cache_index, 0, 0)
                cache = {"key": jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), at),
                         "value": jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), at)}
        out = Projection(heads, (cfg.d_model,), ("heads", "kv", "embed"), cfg.compute_dtype, cfg.use_bias,
                         name="out")(out)
        return out, cache


class Mlp(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        dense = dict(dtype=cfg.compute_dtype, use_bias=cfg.use_bias, kernel_init=dense_init(("embed", "mlp")),
                     bias_init=dense_init(("mlp",), nn.initializers.zeros), dot_general=dot_f32_accumulate)
        if cfg.mlp_type == "swiglu":
            gate = on_rows(nn.Dense(cfg.mlp_dim, name="wi_gate", **dense), x)
            h = nn.silu(gate) * on_rows(nn.Dense(cfg.mlp_dim, name="wi", **dense), x)
        else:
            h = nn.gelu(on_rows(nn.Dense(cfg.mlp_dim, name="wi", **dense), x))
        h = _constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return on_rows(nn.Dense(cfg.d_model, dtype=cfg.compute_dtype, use_bias=cfg.use_bias, name="wo",
                                dot_general=dot_f32_accumulate, kernel_init=dense_init(("mlp", "embed")),
                                bias_init=dense_init(("embed",), nn.initializers.zeros)), h)


def modulation(cond: Array | None, num: int, d_model: int, name: str) -> list[Array | None]:
    """adaLN-zero: `num` vectors [B, 1, D] from cond (zero-initialised), or Nones without conditioning.

    Called inside a compact `__call__`, so the Dense registers on the calling module.
    """
    if cond is None:
        return [None] * num
    mod = nn.Dense(
        num * d_model,
        kernel_init=dense_init(("cond", "embed"), nn.initializers.zeros),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )(nn.silu(cond))
    return [m[:, None, :] for m in jnp.split(mod, num, axis=-1)]


def modulate(x: Array, shift: Array | None, scale: Array | None) -> Array:
    return x if shift is None else x * (1 + scale.astype(x.dtype)) + shift.astype(x.dtype)


def gated_residual(x: Array, gate: Array | None, h: Array) -> Array:
    """x + gate * h (adaLN-zero's gate; x + h without conditioning)."""
    return x + (h if gate is None else gate.astype(h.dtype) * h)


class Block(nn.Module):
    """x + gate * Attn(modulate(norm(x))); x + gate * MLP(modulate(norm(x)))."""

    cfg: TransformerConfig
    deterministic: bool = True
    mask_mode: str = "full"
    read_cache: bool = True

    @nn.compact
    def __call__(self, x: Array, cond: Array | None, cos: Array, sin: Array, cache: KVCache | None = None,
                 cache_index: Array | None = None, cache_len: Array | None = None,
                 mask: Array | None = None) -> tuple[Array, KVCache | None]:
        cfg = self.cfg
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation(cond, 6, cfg.d_model, "adaln")
        h, cache = Attention(cfg, self.mask_mode, self.read_cache, name="attention")(
            modulate(backbone_norm(cfg, "norm1")(x), shift1, scale1), cos, sin, cache, cache_index, cache_len,
            mask=mask)
        h = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(h)
        x = gated_residual(x, gate1, h)
        h = Mlp(cfg, name="mlp")(modulate(backbone_norm(cfg, "norm2")(x), shift2, scale2))
        h = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(h)
        x = gated_residual(x, gate2, h)
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        self.sow("intermediates", "hidden", x)
        return x, cache


def embed_tokens(cfg: TransformerConfig, tokens: Array, positions: Array | None = None) -> Array:
    """tokens [B, L] -> [B, L, D] through the `embed` table (registered on the calling compact module), plus the
    `pos_embed` rows of `positions` [L] when given."""
    embed = nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        name="embed",
    )
    x = embed(tokens).astype(cfg.compute_dtype)
    if positions is not None:  # learned positions (GPT-2): a second table, indexed by position
        x = x + nn.Embed(cfg.max_positions, cfg.d_model, name="pos_embed", embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, "embed")))(positions)[None].astype(cfg.compute_dtype)
    return _constrain(x, ("activation_batch", "activation_length", "activation_embed"))


def time_condition(cfg: TransformerConfig, t: Array, prefix: str = "time") -> Array:
    """adaLN conditioning vector [B, cond_dim] of t [B]: sinusoidal -> Dense `<prefix>_in` -> SiLU -> `<prefix>_out`."""
    dense = dict(kernel_init=dense_init((None, "cond")))
    cond = nn.Dense(cfg.cond_dim, name=f"{prefix}_in", **dense)(timestep_embedding(t, cfg.cond_dim))
    return nn.Dense(cfg.cond_dim, name=f"{prefix}_out", **dense)(nn.silu(cond))


def final_norm(cfg: TransformerConfig, x: Array, cond: Array | None, prefix: str = "") -> Array:
    """The last (adaLN-modulated) norm before a head: [B, L, D] -> [B, L, D]."""
    shift, scale = modulation(cond, 2, cfg.d_model, f"{prefix}final_adaln")
    return modulate(backbone_norm(cfg, f"{prefix}final_norm")(x), shift, scale)


def output_head(cfg: TransformerConfig, x: Array, features: int, name: str = "head",
                axis: str | None = "vocab") -> Array:
    """A zero-initialised linear read-out of the final normed hidden state: [B, L, D] -> [B, L, features] float32."""
    out = on_rows(nn.Dense(features, dtype=cfg.compute_dtype, use_bias=cfg.use_bias, dot_general=dot_f32_accumulate,
                           kernel_init=dense_init(("embed", axis), nn.initializers.zeros),
                           bias_init=dense_init((axis,), nn.initializers.zeros), name=name), x)
    return _constrain(out.astype(jnp.float32),
                      ("activation_batch", "activation_length", f"activation_{axis}" if axis else None))


def remat_block(block: type[nn.Module], cfg: TransformerConfig) -> type[nn.Module]:
    """The block class under the configured rematerialisation (none | full | dots)."""
    if cfg.remat == "none":
        return block
    policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if cfg.remat == "dots" else None
    return nn.remat(block, prevent_cse=not cfg.scan_layers, policy=policy)


def scanned_layers(block: type[nn.Module], cfg: TransformerConfig, in_axes: tuple, *args) -> nn.Module:
    """`cfg.num_layers` copies of `block(cfg, *args)` under one `nn.scan` named `layers` (params stacked on a
    leading `layers` axis; sown `intermediates` stacked too)."""
    return nn.scan(
        remat_block(block, cfg),
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, *args, name="layers")


def run_layers(cfg: TransformerConfig, deterministic: bool, mask_mode: str, x: Array, cond: Array | None,
               cos: Array, sin: Array, cache: KVCache | None = None, cache_index: Array | int = 0,
               cache_len: Array | None = None, read_cache: bool = True,
               mask: Array | None = None) -> tuple[Array, KVCache | None]:
    """The stack of `Block`s (scanned, or unrolled as `layer_i`), each with its slice of the KV cache."""
    if cfg.scan_layers:
        stack = scanned_layers(Block, cfg, (nn.broadcast,) * 3 + (0,) + (nn.broadcast,) * 3,
                               deterministic, mask_mode, read_cache)
        return stack(x, cond, cos, sin, cache, cache_index, cache_len, mask)
    block = remat_block(Block, cfg)
    layer_caches = []
    for i in range(cfg.num_layers):
        layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
        x, layer_cache = block(cfg, deterministic, mask_mode, read_cache, name=f"layer_{i}")(
            x, cond, cos, sin, layer_cache, cache_index, cache_len, mask)
        layer_caches.append(layer_cache)
    if cache is not None:
        cache = jax.tree.map(lambda *c: jnp.stack(c), *layer_caches)
    return x, cache


class Transformer(nn.Module):
    """tokens [B, L] (+ t [B] when time-conditioned) -> logits [B, L, vocab] in float32.

    With `cache` (from `init_cache`) the tokens are a block at positions [cache_index, cache_index + L) that
    attends to the prefix cache[:cache_index] and itself (a Python int 0 means an empty cache: not read); the call
    then returns (logits, cache with the block's K/V written at cache_index). With `cache_len` the block reads
    cache[:cache_len] instead and the cache is returned unchanged (a read-only cache of other positions, e.g.
    Fast-dLLM's dual cache). `positions` [L] overrides the token positions (block diffusion trains on
    x_t (+) x_0, both halves at 0..L-1); `mask_mode` overrides cfg.mask_mode; `attention_mask` [L, L] bool (no
    cache, xla attention) further restricts it (MDLM's annealed mask). Applied with
    `mutable="intermediates"` it also sows every layer's output (`hidden`, stacked [num_layers, B, L, D] when
    scanned) and the final normed hidden state (`final_hidden`): what a frozen encoder reads (`hidden_states`).
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens: Array, t: Array | None = None, deterministic: bool = True,
                 cache: KVCache | None = None, cache_index: Array | int = 0, cache_len: Array | None = None,
                 positions: Array | None = None, mask_mode: str | None = None,
                 attention_mask: Array | None = None) -> Array | tuple[Array, KVCache]:
        cfg = self.cfg
        mask_mode = mask_mode or cfg.mask_mode
        read_cache = not (isinstance(cache_index, int) and cache_index == 0 and cache_len is None)
        cache_index = jnp.asarray(cache_index, jnp.int32)
        if positions is None:
            positions = jnp.arange(tokens.shape[1]) + (cache_index if cache is not None else 0)
        learned = cfg.positions == "learned"
        x = embed_tokens(cfg, tokens, positions if learned else None)  # [B, L, D]
        cond = None
        if cfg.time_conditioning:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t")
            cond = time_condition(cfg, t)  # [B, cond_dim]
        cos, sin = (None, None) if learned else rotary_tables(positions, cfg.head_dim, cfg.rope_base)
        x, cache = run_layers(cfg, deterministic, mask_mode, x, cond, cos, sin, cache, cache_index, cache_len,
                              read_cache, attention_mask)
        x = final_norm(cfg, x, cond)
        self.sow("intermediates", "final_hidden", x)
        logits = output_head(cfg, x, cfg.vocab_size)
        return logits if cache is None else (logits, cache)


def hidden_states(model: Transformer, params: Any, tokens: Array, t: Array | None, layer: int) -> Array:
    """The residual stream after block `layer` (1..num_layers) or, for layer 0, the final normed hidden state
    (what the head reads): [B, L, D], from one forward with the sown intermediates."""
    _, state = model.apply({"params": params}, tokens, t, mutable="intermediates")
    if layer == 0:
        return state["intermediates"]["final_hidden"][0]
    cfg = model.cfg
    if cfg.scan_layers:
        return state["intermediates"]["layers"]["hidden"][0][layer - 1]
    return state["intermediates"][f"layer_{layer - 1}"]["hidden"][0]


def init_cache(cfg: TransformerConfig, batch: int, max_len: int) -> KVCache:
    """An empty KV cache: key/value [num_layers, batch, max_len, heads, head_dim] in the compute dtype."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_heads, cfg.head_dim)
    return {"key": jnp.zeros(shape, cfg.compute_dtype), "value": jnp.zeros(shape, cfg.compute_dtype)}


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of the matmuls, attention included."""
    mlp_mats = 3 if cfg.mlp_type == "swiglu" else 2
    per_layer = 2 * (4 * cfg.d_model * cfg.d_model + mlp_mats * cfg.d_model * cfg.mlp_dim)  # projections + MLP
    per_layer += 2 * 2 * seq_len * cfg.d_model  # q k^T and probs v
    return 3.0 * (cfg.num_layers * per_layer + 2 * cfg.d_model * cfg.vocab_size)
