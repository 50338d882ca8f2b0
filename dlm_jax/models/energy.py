"""The EDLM-NCE energy network (Xu et al. 2025; DESIGN.md section 6): the backbone reading a linear map of
[emb(x_t); emb(x_0)], final norm, mean-pool over positions, Linear -> ReLU -> Linear -> a scalar energy per row.

The backbone pieces keep the backbone's parameter names (embed, time_*, layers / layer_i, final_*), so the energy
net is initialised from a trained MDLM of the same shape (`families/edlm.py`); `pair_in` starts as the average of
the two embeddings (the MDLM's own input where x_t shows x_0), the MLP head at a small random init.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlm_jax.models.features import rotary_tables
from dlm_jax.models.transformer import (
    TransformerConfig,
    dense_init,
    embed_tokens,
    final_norm,
    run_layers,
    time_condition,
)

Array = jax.Array


def _pair_init(key, shape, dtype=jnp.float32):
    """[2D, D]: x_t and x_0 embeddings averaged, (I; I) / 2."""
    del key
    d = shape[1]
    return jnp.concatenate([jnp.eye(d, dtype=dtype), jnp.eye(d, dtype=dtype)]) * 0.5


class EnergyNet(nn.Module):
    """(x_t [B, L], x_0 [B, L], t [B] | None) -> E [B] float32 (t is read only when cfg.time_conditioning)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_t: Array, x0: Array, t: Array | None = None, deterministic: bool = True) -> Array:
        cfg = self.cfg
        both = embed_tokens(cfg, jnp.concatenate([x_t, x0], axis=0))
        pair = jnp.concatenate(jnp.split(both, 2, axis=0), axis=-1)  # [B, L, 2D]
        x = nn.Dense(cfg.d_model, dtype=cfg.compute_dtype, use_bias=False,
                     kernel_init=dense_init((None, "embed"), _pair_init), name="pair_in")(pair)
        cond = time_condition(cfg, t) if cfg.time_conditioning else None
        cos, sin = rotary_tables(jnp.arange(x_t.shape[1]), cfg.head_dim, cfg.rope_base)
        x, _ = run_layers(cfg, deterministic, "full", x, cond, cos, sin)
        pooled = final_norm(cfg, x, cond).astype(jnp.float32).mean(axis=1)  # [B, D]
        h = nn.relu(nn.Dense(cfg.d_model, kernel_init=dense_init(("embed", "mlp")), name="energy_hidden")(pooled))
        return nn.Dense(1, kernel_init=dense_init(("mlp", None)), name="energy_out")(h)[:, 0]
