"""Cosmos's networks (Meshchaninov et al. 2025, arXiv 2506.21170; DESIGN.md section 7).

`CosmosAutoencoder`: encoder states [B, L, S] (a frozen encoder's, standardised) or trainable token embeddings,
plus learned positions, are compressed by N learned latents (`CrossBlock`s: queries the latents, keys / values
[latents; states], pre-RMSNorm on both sides, optional qk-norm, then an MLP; residual; final RMSNorm) into
latents [B, N, D]; the decoder's L query slots (a learned [MASK] embedding + positions) attend over
[latents + positions; slots] the same way and give token logits and hidden states (read against the encoder's
states by the MSE term). Besides the learned additive positions, every cross-attention applies rotary embeddings
on token-scale positions (token i at i, latent j at the centre of its span, (j + 1/2) L / N - 1/2): without that
locality prior a byte autoencoder on shakespeare sat at the unigram loss for hundreds of steps (docs/cosmos.md).

`LatentDenoiser`: the backbone's time-conditioned `Block`s over the N latent slots with U-Net long skips (block i
of the second half reads Linear([x; output of block L-1-i])), x0-prediction, self-conditioning as a second input.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlm_jax.models.features import apply_rotary, rotary_tables
from dlm_jax.models.transformer import (
    Block,
    Mlp,
    Norm,
    Projection,
    TransformerConfig,
    dense_init,
    final_norm,
    output_head,
    time_condition,
)

Array = jax.Array
NEG_INF = -1e30  # additive logit of a key that is not attended (finite: a row never becomes all -inf)


def learned_positions(length: int, width: int) -> nn.Module:
    """A [length, width] table of learned position vectors (normal(0.02)); index it with positions [L]."""
    return nn.Embed(length, width, embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                                (None, "embed")))


class CrossBlock(nn.Module):
    """x <- x + Attn(q = norm(x), kv = [norm(context); norm(x)]); x <- x + MLP(norm(x)).

    x [B, Q, D] queries, context [B, M, D]; `keep` [B, M] (bool) drops context positions from the key set;
    x_pos [Q], context_pos [M] (float, token units): rotary positions of queries and keys (None: no rotary)."""

    cfg: TransformerConfig
    qk_norm: bool = False

    @nn.compact
    def __call__(self, x: Array, context: Array, keep: Array, x_pos: Array | None = None,
                 context_pos: Array | None = None) -> Array:
        cfg = self.cfg
        heads = (cfg.num_heads, cfg.head_dim)
        queries = Norm(cfg.norm, name="norm_query")(x)
        keys_in = jnp.concatenate([Norm(cfg.norm, name="norm_context")(context), queries], axis=1)  # [B, M + Q, D]
        q, k, v = (Projection((cfg.d_model,), heads, ("embed", "heads", "kv"), cfg.compute_dtype, name=n)(src)
                   for n, src in (("query", queries), ("key", keys_in), ("value", keys_in)))  # [B, *, H, Dh]
        if self.qk_norm:
            q, k = Norm(cfg.norm, name="q_norm")(q), Norm(cfg.norm, name="k_norm")(k)
        if x_pos is not None:  # rotary on token-scale positions: a latent attends near the span it stands for
            q = apply_rotary(q, *rotary_tables(x_pos, cfg.head_dim, cfg.rope_base))
            k = apply_rotary(k, *rotary_tables(jnp.concatenate([context_pos, x_pos]), cfg.head_dim, cfg.rope_base))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(cfg.head_dim)
        visible = jnp.concatenate([keep, jnp.ones(x.shape[:2], bool)], axis=1)  # a query always sees the queries
        logits = jnp.where(visible[:, None, None, :], logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        x = x + Projection(heads, (cfg.d_model,), ("heads", "kv", "embed"), cfg.compute_dtype, name="out")(out)
        return x + Mlp(cfg, name="mlp")(Norm(cfg.norm, name="norm_mlp")(x))


class CosmosAutoencoder(nn.Module):
    """inputs (states [B, L, S] float, or tokens [B, L] int with state_dim 0) -> latents [B, N, D] -> (logits
    [B, L, V] float32, hidden [B, L, S] float32 or None). `encode` / `decode` are the two halves."""

    cfg: TransformerConfig
    seq_len: int
    num_latents: int
    state_dim: int = 0  # width of the frozen encoder's states; 0: trainable token embeddings
    qk_norm: bool = False

    def setup(self):
        cfg = self.cfg
        if self.state_dim:
            self.state_in = nn.Dense(cfg.d_model, use_bias=False, kernel_init=dense_init((None, "embed")))
            self.hidden_out = nn.Dense(self.state_dim, use_bias=False, kernel_init=dense_init(("embed", None)))
        else:
            self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")))
        self.state_positions = learned_positions(self.seq_len, cfg.d_model)
        self.latents = self.param("latents", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                          (None, "embed")),
                                  (self.num_latents, cfg.d_model))
        self.compressor = [CrossBlock(cfg, self.qk_norm) for _ in range(cfg.num_layers)]
        self.compressor_norm = Norm(cfg.norm)
        self.latent_positions = learned_positions(self.num_latents, cfg.d_model)
        self.slot_positions = learned_positions(self.seq_len, cfg.d_model)
        self.mask_embedding = self.param("mask_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (cfg.d_model,))
        self.decoder = [CrossBlock(cfg, self.qk_norm) for _ in range(cfg.num_layers)]
        self.decoder_norm = Norm(cfg.norm)
        self.head = nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=dense_init(("embed", "vocab")))

    def latent_pos(self) -> Array:
        """[N] float: the centre of the token span each latent stands for ((j + 1/2) L / N - 1/2)."""
        return (jnp.arange(self.num_latents, dtype=jnp.float32) + 0.5) * (self.seq_len / self.num_latents) - 0.5

    def encode(self, inputs: Array, keep: Array) -> Array:
        """latents [B, N, D]; keep [B, L] (bool): the input positions the compressor may attend to."""
        x = self.state_in(inputs) if self.state_dim else self.embed(inputs)
        x = x.astype(self.cfg.compute_dtype) + self.state_positions(jnp.arange(inputs.shape[1]))
        latents = jnp.broadcast_to(self.latents, (x.shape[0], *self.latents.shape)).astype(x.dtype)
        for block in self.compressor:
            latents = block(latents, x, keep, self.latent_pos(), jnp.arange(inputs.shape[1], dtype=jnp.float32))
        return self.compressor_norm(latents)

    def decode(self, latents: Array) -> tuple[Array, Array | None]:
        n = latents.shape[0]
        context = latents + self.latent_positions(jnp.arange(self.num_latents))
        slots = jnp.broadcast_to(self.mask_embedding + self.slot_positions(jnp.arange(self.seq_len)),
                                 (n, self.seq_len, self.cfg.d_model)).astype(latents.dtype)
        keep = jnp.ones((n, self.num_latents), bool)
        for block in self.decoder:
            slots = block(slots, context, keep, jnp.arange(self.seq_len, dtype=jnp.float32), self.latent_pos())
        slots = self.decoder_norm(slots)
        logits = self.head(slots).astype(jnp.float32)
        hidden = self.hidden_out(slots).astype(jnp.float32) if self.state_dim else None
        return logits, hidden

    def __call__(self, inputs: Array, keep: Array) -> tuple[Array, Array | None]:
        return self.decode(self.encode(inputs, keep))


class LatentDenoiser(nn.Module):
    """(z_t [B, N, C], t [B], x0_sc [B, N, C] | None) -> x0_hat [B, N, C] float32 (zero at init).

    Without `self_condition` the module has no self-conditioning input; with it, x0_sc = 0 gives exactly the
    output of that module on the same other params (the input is added through a bias-free Linear)."""

    cfg: TransformerConfig  # time_conditioning on; vocab_size unused
    latent_dim: int
    self_condition: bool = True

    @nn.compact
    def __call__(self, z_t: Array, t: Array, x0_sc: Array | None = None, deterministic: bool = True) -> Array:
        cfg = self.cfg
        dense = dict(use_bias=False, dtype=cfg.compute_dtype, kernel_init=dense_init((None, "embed")))
        x = nn.Dense(cfg.d_model, name="latent_in", **dense)(z_t)
        if self.self_condition:
            x = x + nn.Dense(cfg.d_model, name="self_cond_in", **dense)(jnp.zeros_like(z_t) if x0_sc is None
                                                                         else x0_sc)
        cond = time_condition(cfg, t)
        cos, sin = rotary_tables(jnp.arange(z_t.shape[1]), cfg.head_dim, cfg.rope_base)
        skips, first_up = [], cfg.num_layers - cfg.num_layers // 2
        for i in range(cfg.num_layers):
            if i >= first_up:  # U-Net long skip from the mirrored block of the first half
                x = nn.Dense(cfg.d_model, name=f"skip_{i}", use_bias=False, dtype=cfg.compute_dtype,
                             kernel_init=dense_init((None, "embed")))(jnp.concatenate([x, skips.pop()], axis=-1))
            x, _ = Block(cfg, deterministic, "full", name=f"layer_{i}")(x, cond, cos, sin)
            if i < cfg.num_layers // 2:
                skips.append(x)
        return output_head(cfg, final_norm(cfg, x, cond), self.latent_dim, name="x0_out", axis=None)
