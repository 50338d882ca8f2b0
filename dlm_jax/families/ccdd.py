"""CCDD: joint continuous-discrete diffusion over masked tokens and a per-token latent (DESIGN.md section 5).

z_0 = standardised features of the clean text from a frozen `encoder` component (a trained ar or mdlm workdir of
this codebase: its hidden states at `ccdd.encoder_layer`); the denoiser is `models/ccdd.py:CCDDNetwork`; the math
is `diffusion/ccdd.py` and the sampler `sampling/ccdd.py`. Eval reports a valid upper bound on -log p(x) as
`nelbo` and, labelled, the paper's token term given the latent path (not a bound: docs/ccdd.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax.config import choice
from dlm_jax.diffusion import ccdd, gaussian
from dlm_jax.diffusion.masked import forward_mask, masked_nll_terms
from dlm_jax.diffusion.schedules import sample_times
from dlm_jax.errors import UserError
from dlm_jax.families import registry
from dlm_jax.families.base import Sampler
from dlm_jax.families.mdlm import MaskedFamily, masked_process_section
from dlm_jax.models.ccdd import FUSIONS, CCDDNetwork
from dlm_jax.models.transformer import hidden_states
from dlm_jax.sampling import ccdd as ccdd_sampling
from dlm_jax.sampling.loop import SampleSpec

Array = jax.Array
BOUND_TERMS = ("tokens_given_latent", "recon", "latent", "prior")  # per-row pieces of the bound, in nats


def _check(family: CCDD, spec: SampleSpec, template: Any) -> None:
    del template
    if spec.length > family.config.data.seq_len:
        raise UserError(f"the model was trained on data.seq_len={family.config.data.seq_len} tokens; cannot sample "
                        f"{spec.length} (lower --length)")
    if not np.isfinite(spec.options.guidance):
        raise UserError(f"--sampler.guidance must be a finite number, got {spec.options.guidance}")


def _sample(family: CCDD, params, rng: Array, spec: SampleSpec, template: Any):
    def net(tokens, z, t):
        logits, z0_hat, _ = family.model.apply({"params": params}, tokens, z, t)
        return logits, z0_hat

    guidance = None if spec.options.guidance == 1.0 else spec.options.guidance
    return ccdd_sampling.sample(net, rng, family.masked_template(template), spec, family.masked_sampling(spec),
                                family.latent_schedule, family.section.latent_dim, guidance)


@registry.register
class CCDD(MaskedFamily):
    """Masked tokens + a Gaussian latent on one t; loss = token NELBO + w(t) latent MSE (+ MoE balance)."""

    name: ClassVar[str] = "ccdd"
    mask_mode: ClassVar[str] = "full"
    component_families: ClassVar[dict[str, tuple[str, ...]]] = {"encoder": ("ar", "mdlm")}
    shape_keys: ClassVar[tuple[str, ...]] = ("fusion", "latent_dim", "independent_t")
    samplers: ClassVar[dict[str, Sampler]] = {
        "ccdd": Sampler(_sample, ccdd_sampling.CCDDOptions, _check,
                        "joint step t -> s: a masked commit rule for x, DDIM / DDPM for z, optional guidance"),
    }

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        s = masked_process_section()  # the token half: schedule, schedule_power, t_eps, antithetic
        s.fusion = "sum"  # sum (MDiT) | two_stream (MMDiT) | joint_attention (MoEDiT)
        s.latent_dim = 32  # C: channels of z_0 per token
        s.latent_schedule = "vp_linear"  # vp_linear (a = sqrt(1-t), b = sqrt(t)) | flow_linear (a = 1-t, b = t)
        s.latent_weighting = "ddpm_x"  # w(t) = min(1/(1-t), 10) | inv_snr: min(t/(1-t), 10)
        s.latent_weight = 1.0  # the latent MSE's weight in the loss
        s.independent_t = False  # the latent gets its own t ~ U[t_eps, 1] in training (a second time embedding)
        s.p_drop_latent = 0.1  # training: z_t zeroed for this fraction of rows (what guidance needs)
        s.p_r_max = 0.0  # per batch p ~ U[0, p_r_max]: a token's z_0 comes from the masked x_t w.p. p (mdlm encoder)
        s.encoder_layer = 0  # 0: the encoder's final normed hidden state; k: the residual stream after block k
        s.encoder_projection = "slice"  # slice: the first latent_dim channels | random: a fixed projection
        s.moe_top_k = 1  # joint_attention: experts per token (1 or 2 of the 2)
        s.moe_balance_weight = 0.01  # joint_attention: weight of the MoE load-balancing loss
        return s

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        super().validate(config)
        c = config.ccdd
        choice("ccdd.fusion", c.fusion, FUSIONS)
        choice("ccdd.latent_schedule", c.latent_schedule, ccdd.LATENT_SCHEDULES)
        choice("ccdd.latent_weighting", c.latent_weighting, ccdd.LATENT_WEIGHTINGS)
        choice("ccdd.encoder_projection", c.encoder_projection, ccdd.PROJECTIONS)
        choice("ccdd.moe_top_k", c.moe_top_k, (1, 2))
        for key in ("p_drop_latent", "p_r_max"):
            if not 0.0 <= c[key] <= 1.0:
                raise UserError(f"ccdd.{key} must be in [0, 1], got {c[key]}")
        for key in ("latent_weight", "moe_balance_weight"):
            if c[key] < 0:
                raise UserError(f"ccdd.{key} must be >= 0, got {c[key]}")
        if c.latent_dim < 1 or c.encoder_layer < 0:
            raise UserError(f"ccdd.latent_dim must be >= 1 and ccdd.encoder_layer >= 0 (0: final hidden state), "
                            f"got {c.latent_dim}, {c.encoder_layer}")

    def __init__(self, config, tokenizer, components):
        super().__init__(config, tokenizer, components)
        c = self.section
        # always adaLN time-conditioned: the latent's noise level must be known (model.time_conditioning not read)
        cfg = dataclasses.replace(self.model.cfg, time_conditioning=True)
        self.model = CCDDNetwork(cfg, c.fusion, c.latent_dim, c.independent_t, c.moe_top_k)
        encoder = components["encoder"]
        key = f"components.encoder.workdir={encoder.workdir!r}"
        enc_cfg = encoder.family.model.cfg
        if c.encoder_layer > enc_cfg.num_layers:
            raise UserError(f"ccdd.encoder_layer={c.encoder_layer}: the encoder has {enc_cfg.num_layers} layers")
        if c.encoder_projection == "slice" and c.latent_dim > enc_cfg.d_model:
            raise UserError(f"ccdd.latent_dim={c.latent_dim} is wider than the encoder ({enc_cfg.d_model}); lower it "
                            "or use ccdd.encoder_projection=random")
        if c.p_r_max and encoder.config.model.family != "mdlm":
            raise UserError(f"ccdd.p_r_max > 0 encodes masked text: it needs an mdlm encoder ({key} is "
                            f"{encoder.config.model.family})")
        self.encoder = encoder.family

    @property
    def latent_schedule(self) -> gaussian.LatentSchedule:
        return gaussian.LatentSchedule(self.section.latent_schedule)

    def init_params(self, rng: Array) -> Any:
        tokens = jnp.zeros((1, self.config.data.seq_len), jnp.int32)
        z = jnp.zeros((1, self.config.data.seq_len, self.section.latent_dim))
        return self.model.init(rng, tokens, z, jnp.ones((1,)), jnp.ones((1,)))["params"]

    # -- z_0 ----------------------------------------------------------------------------------------
    def encode(self, tokens: Array, t: Array | None = None) -> Array:
        """z_0 [B, L, C] of tokens [B, L] from the frozen encoder (an mdlm encoder reads them at time t, default
        0 = clean); no gradient reaches the encoder."""
        enc = self.encoder
        if enc.model.cfg.time_conditioning:
            t = jnp.zeros((tokens.shape[0],)) if t is None else t
        else:
            t = None
        hidden = hidden_states(enc.model, self.frozen["encoder"], tokens, t, self.section.encoder_layer)
        return jax.lax.stop_gradient(ccdd.latent_features(hidden, self.section.latent_dim,
                                                          self.section.encoder_projection))

    def latent_target(self, x0: Array, x_t: Array, t: Array, rng: Array, train: bool) -> Array:
        """z_0 of the clean text; with p_r (training) each token's z_0 comes w.p. p ~ U[0, p_r_max] (one p per batch)
        from the encoder reading the masked x_t, zeroed where x_t is [MASK]."""
        z0 = self.encode(x0)
        if not (train and self.section.p_r_max):
            return z0
        rng_p, rng_pick = jax.random.split(rng)
        p = jax.random.uniform(rng_p, ()) * self.section.p_r_max
        from_masked = jnp.where((x_t == self.mask_id)[..., None], 0.0, self.encode(x_t, t))
        pick = jax.random.uniform(rng_pick, x0.shape) < p
        return jnp.where(pick[..., None], from_masked, z0)

    # -- training -----------------------------------------------------------------------------------
    def loss(self, params, batch, rng, train):
        """Token NELBO (MDLM's weights) + latent_weight x w(t) latent MSE (+ the MoE balance term), per token.

        The random streams of the token half match MDLM's (`diffusion/masked.py:nelbo_terms`), so with the latent
        zeroed and latent_weight 0, `sum` fusion trains exactly as a time-conditioned MDLM of the same seed."""
        x0, loss_mask = batch["tokens"], batch["loss_mask"]
        c, n = self.section, x0.shape[0]
        rng_noise, rng_dropout = jax.random.split(rng)
        rng_t, rng_mask = jax.random.split(rng_noise)  # MDLM's token streams
        rng_z, rng_drop, rng_pr, rng_tz = jax.random.split(jax.random.fold_in(rng_noise, 1), 4)  # the latent's
        t = sample_times(rng_t, n, c.t_eps, c.antithetic)
        t_latent = sample_times(rng_tz, n, c.t_eps, c.antithetic) if c.independent_t else t
        x_t, is_masked = forward_mask(rng_mask, x0, self.schedule.alpha(t), self.mask_id)
        z0 = self.latent_target(x0, x_t, t, rng_pr, train)
        z_t = gaussian.noisy_latent(z0, t_latent, jax.random.normal(rng_z, z0.shape), self.latent_schedule)
        if train and c.p_drop_latent:  # rows trained without the latent: what guidance's f(x_t, 0) needs
            z_t = jnp.where((jax.random.uniform(rng_drop, (n,)) < c.p_drop_latent)[:, None, None], 0.0, z_t)
        logits, z0_hat, balance = self.model.apply({"params": params}, x_t, z_t, t, t_latent,
                                                   deterministic=not train, rngs={"dropout": rng_dropout})
        tokens = masked_nll_terms(logits, x0, is_masked, loss_mask, t, self.schedule, 0, self.mask_id)
        latent = ccdd.latent_loss_terms(z0_hat, z0, t_latent, c.latent_weighting, loss_mask)
        count = jnp.maximum(tokens["num_tokens"], 1.0)
        token_loss, latent_loss = tokens["nll_sum"] / count, latent["latent_sum"] / count
        loss = token_loss + c.latent_weight * latent_loss
        metrics = {"token_nelbo": token_loss, "latent_loss": latent_loss,
                   "latent_mse": latent["latent_mse_sum"] / count, "mask_rate": tokens["mask_rate"]}
        if c.fusion == "joint_attention":
            loss = loss + c.moe_balance_weight * balance
            metrics["moe_balance"] = balance
        return loss, metrics

    # -- the bound ----------------------------------------------------------------------------------
    def eval_terms(self, params, batch, rng):
        """Per row [B], in nats: the bound's pieces (`diffusion/ccdd.py:bound_terms`) and the row's token count."""
        def joint(x_t, z_t, t):
            logits, z0_hat, _ = self.model.apply({"params": params}, x_t, z_t, t, t)
            return logits, z0_hat

        terms = ccdd.bound_terms(joint, batch["tokens"], self.encode(batch["tokens"]), batch["loss_mask"], rng,
                                 self.schedule, self.latent_schedule, self.section.t_eps, self.mask_id,
                                 self.section.antithetic)
        return {**terms, "tokens": batch["loss_mask"].sum(axis=1)}

    def likelihood_terms(self, params, batch, rng):
        """The valid bound on -log p(x) (summed over the batch): the sum of the BOUND_TERMS."""
        terms = self.eval_terms(params, batch, rng)
        return {"nll_sum": sum(terms[k].sum() for k in BOUND_TERMS), "num_tokens": terms["tokens"].sum()}

    def eval_summary(self, per_row: dict[str, Any]) -> dict[str, Any]:
        """Per-token pieces of the bound, and the paper's token term given the latent path with its ppl."""
        count = max(float(per_row["tokens"].sum()), 1.0)
        out = {f"bound_{k}": float(per_row[k].sum()) / count for k in BOUND_TERMS}
        out["nelbo_tokens_given_latent"] = out.pop("bound_tokens_given_latent")
        out["ppl_tokens_given_latent"] = float(np.exp(min(out["nelbo_tokens_given_latent"], 700.0)))
        return out

