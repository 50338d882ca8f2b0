"""The CCDD joint denoiser (Zhou et al. 2025, arXiv 2510.03206): masked tokens x_t and a continuous per-token
latent z_t [B, L, C] in, token logits and z0_hat out, built from the backbone's blocks (DESIGN.md section 5).

Fusion variants (`ccdd.fusion`), all adaLN-conditioned on t:
  sum              MDiT: one stream, emb(x_t) + latent_embed(z_t), the backbone's own `Block`s
  two_stream       MMDiT: a token and a latent stream; per layer self-attention in each, cross-attention both
                   ways, a separate MLP each
  joint_attention  MoEDiT: one attention over [x; z] (2L positions, shared QKV, x_i and z_i both at rotary
                   position i) and a 2-expert MoE MLP shared by both streams, with a load-balancing loss
latent_embed = a norm over the C channels (adaLN-modulated) + a linear, zero-initialised for `sum` so a fresh `sum`
model is exactly the token backbone. The token path keeps the backbone's parameter names (embed, time_*, layers,
final_*, head), so the same seed initialises it as an MDLM of the same size.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlm_jax.models.features import rotary_tables
from dlm_jax.models.transformer import (
    Attention,
    Mlp,
    Norm,
    TransformerConfig,
    dense_init,
    embed_tokens,
    final_norm,
    gated_residual,
    modulate,
    modulation,
    output_head,
    remat_block,
    run_layers,
    scanned_layers,
    time_condition,
)

Array = jax.Array
FUSIONS = ("sum", "two_stream", "joint_attention")
NUM_EXPERTS = 2


class LatentEmbed(nn.Module):
    """z [B, L, C] -> [B, L, D]: RMS-normalised over the C channels, adaLN shift/scale from t, then a linear:
    zero-initialised when it is added to the token embedding (`sum`: a fresh model ignores z), normally
    initialised when it starts a stream of its own (an all-zero stream under zero-initialised gates and head would
    get no gradient: its latent path could never train)."""

    cfg: TransformerConfig
    latent_dim: int
    zero_init: bool = True

    @nn.compact
    def __call__(self, z: Array, cond: Array) -> Array:
        z = z.astype(jnp.float32)
        z = z * jax.lax.rsqrt(jnp.mean(jnp.square(z), axis=-1, keepdims=True) + 1e-6)
        mod = nn.Dense(2 * self.latent_dim, kernel_init=dense_init(("cond", None), nn.initializers.zeros),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), name="adaln")(
            nn.silu(cond))
        shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
        z = modulate(z, shift, scale).astype(self.cfg.compute_dtype)
        init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        return nn.Dense(self.cfg.d_model, dtype=self.cfg.compute_dtype, use_bias=False,
                        kernel_init=dense_init((None, "embed"), init), name="proj")(z)


class TwoStreamBlock(nn.Module):
    """MMDiT layer: self-attention per stream, cross-attention both ways (each stream's queries against the other's
    normed states), a separate MLP per stream; every sub-layer pre-norm, adaLN-modulated and gated."""

    cfg: TransformerConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], cond: Array, cos: Array, sin: Array):
        cfg = self.cfg
        streams = {"x": carry[0], "z": carry[1]}
        mods = {s: modulation(cond, 9, cfg.d_model, f"{s}_adaln") for s in streams}
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        for s in streams:  # self-attention
            shift, scale, gate = mods[s][0:3]
            h, _ = Attention(cfg, "full", name=f"{s}_self")(
                modulate(Norm(cfg.norm, name=f"{s}_norm1")(streams[s]), shift, scale), cos, sin)
            streams[s] = gated_residual(streams[s], gate, drop(h))
        normed = {s: Norm(cfg.norm, name=f"{s}_norm2")(streams[s]) for s in streams}
        crossed = {}
        for s, other in (("x", "z"), ("z", "x")):  # cross-attention both ways, from the same states
            shift, scale, gate = mods[s][3:6]
            h, _ = Attention(cfg, "full", name=f"{s}_cross")(modulate(normed[s], shift, scale), cos, sin,
                                                              context=normed[other])
            crossed[s] = gated_residual(streams[s], gate, drop(h))
        for s in streams:  # MLPs
            shift, scale, gate = mods[s][6:9]
            h = Mlp(cfg, name=f"{s}_mlp")(modulate(Norm(cfg.norm, name=f"{s}_norm3")(crossed[s]), shift, scale))
            streams[s] = gated_residual(crossed[s], gate, drop(h))
        return (streams["x"], streams["z"]), None


class MoeMlp(nn.Module):
    """A mixture of NUM_EXPERTS MLPs with a router (Shazeer et al. 2017; Switch, Fedus et al. 2022): top-1 routing
    weights the chosen expert by its router probability, top-2 (both experts) mixes them by the probabilities.
    Returns (out [B, N, D], balance): balance = E * sum_e f_e P_e (f_e: fraction of tokens whose top-1 is e, P_e:
    mean router probability of e), 1 when balanced, E when collapsed."""

    cfg: TransformerConfig
    top_k: int = 1

    @nn.compact
    def __call__(self, h: Array) -> tuple[Array, Array]:
        logits = nn.Dense(NUM_EXPERTS, use_bias=False, kernel_init=dense_init(("embed", None)), name="router")(
            h.astype(jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)  # [B, N, E]
        top1 = jax.nn.one_hot(jnp.argmax(probs, axis=-1), NUM_EXPERTS, dtype=probs.dtype)
        weights = top1 * probs if self.top_k == 1 else probs
        out = sum(weights[..., e:e + 1].astype(h.dtype) * Mlp(self.cfg, name=f"expert_{e}")(h)
                  for e in range(NUM_EXPERTS))
        balance = NUM_EXPERTS * jnp.sum(top1.mean(axis=(0, 1)) * probs.mean(axis=(0, 1)))
        return out, balance


class JointBlock(nn.Module):
    """MoEDiT layer: one shared-QKV attention over [x; z] (2L positions), then the MoE MLP over both streams."""

    cfg: TransformerConfig
    deterministic: bool = True
    top_k: int = 1

    @nn.compact
    def __call__(self, carry: tuple[Array, Array, Array], cond: Array, cos: Array, sin: Array):
        cfg = self.cfg
        x, z, balance = carry
        length = x.shape[1]
        mx, mz = (modulation(cond, 6, cfg.d_model, f"{s}_adaln") for s in "xz")
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)

        def joined(i: int, norm: str) -> Array:
            return jnp.concatenate([modulate(Norm(cfg.norm, name=f"x_{norm}")(x), mx[i], mx[i + 1]),
                                    modulate(Norm(cfg.norm, name=f"z_{norm}")(z), mz[i], mz[i + 1])], axis=1)

        h, _ = Attention(cfg, "full", name="attention")(joined(0, "norm1"), cos, sin)  # [B, 2L, D]
        h = drop(h)
        x, z = gated_residual(x, mx[2], h[:, :length]), gated_residual(z, mz[2], h[:, length:])
        h, layer_balance = MoeMlp(cfg, self.top_k, name="moe")(joined(3, "norm2"))
        h = drop(h)
        x, z = gated_residual(x, mx[5], h[:, :length]), gated_residual(z, mz[5], h[:, length:])
        return (x, z, balance + layer_balance), None


def _stream_layers(block: type[nn.Module], cfg: TransformerConfig, carry, cond: Array, cos: Array, sin: Array,
                   *args):
    """cfg.num_layers blocks over a carry of streams (scanned as `layers`, or unrolled as `layer_i`)."""
    if cfg.scan_layers:
        return scanned_layers(block, cfg, (nn.broadcast,) * 3, *args)(carry, cond, cos, sin)[0]
    layer = remat_block(block, cfg)
    for i in range(cfg.num_layers):
        carry, _ = layer(cfg, *args, name=f"layer_{i}")(carry, cond, cos, sin)
    return carry


class CCDDNetwork(nn.Module):
    """(x_t [B, L], z_t [B, L, C], t [B], t_latent [B] | None) -> (logits [B, L, V+1] float32 (raw, before SUBS),
    z0_hat [B, L, C] float32, balance: the MoE load-balancing loss averaged over layers, 0 without MoE)."""

    cfg: TransformerConfig
    fusion: str = "sum"
    latent_dim: int = 32
    independent_t: bool = False  # a second time embedding for the latent's own t
    moe_top_k: int = 1

    @nn.compact
    def __call__(self, tokens: Array, z: Array, t: Array, t_latent: Array | None = None,
                 deterministic: bool = True) -> tuple[Array, Array, Array]:
        cfg = self.cfg
        cond = time_condition(cfg, t)
        if self.independent_t:
            cond = cond + time_condition(cfg, t if t_latent is None else t_latent, prefix="latent_time")
        length = tokens.shape[1]
        cos, sin = rotary_tables(jnp.arange(length), cfg.head_dim, cfg.rope_base)
        x = embed_tokens(cfg, tokens)
        latent = LatentEmbed(cfg, self.latent_dim, self.fusion == "sum", name="latent_embed")(z, cond)
        balance = jnp.zeros((), jnp.float32)
        if self.fusion == "sum":
            x, _ = run_layers(cfg, deterministic, "full", x + latent, cond, cos, sin)
            hz = x
        elif self.fusion == "two_stream":
            x, hz = _stream_layers(TwoStreamBlock, cfg, (x, latent), cond, cos, sin, deterministic)
        elif self.fusion == "joint_attention":
            cos, sin = jnp.concatenate([cos, cos]), jnp.concatenate([sin, sin])  # x_i and z_i share position i
            x, hz, balance = _stream_layers(JointBlock, cfg, (x, latent, balance), cond, cos, sin, deterministic,
                                            self.moe_top_k)
            balance = balance / cfg.num_layers
        else:
            raise ValueError(f"unknown ccdd.fusion {self.fusion!r}")
        logits = output_head(cfg, final_norm(cfg, x, cond), cfg.vocab_size)
        z0_hat = output_head(cfg, final_norm(cfg, hz, cond, "latent_"), self.latent_dim, "latent_head", None)
        return logits, z0_hat, balance
