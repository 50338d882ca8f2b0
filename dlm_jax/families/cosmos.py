"""Cosmos stage 2: Gaussian diffusion in the latent space of a frozen `cosmos_ae` (DESIGN.md section 7,
docs/cosmos.md).

z_0 = the autoencoder's clean latents [N, C], normalised per (slot, channel) with the statistics saved at the end
of its training; z_t = a_t z_0 + b_t eps on the VP tan-d schedule (a_t = 1 / sqrt(1 + d^2 tan^2(pi t / 2)),
`cosmos.schedule_d`); the denoiser (`models/cosmos.py:LatentDenoiser`) predicts z_0, loss = unweighted MSE,
self-conditioning with probability `cosmos.self_condition`. The sampler (`sampling/cosmos.py`) runs 1 -> t_min
and decodes with the autoencoder's decoder. metric_name None: eval reports the MSE; Gen PPL via `eval --gen`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax.diffusion import cosmos, gaussian
from dlm_jax.diffusion.schedules import sample_times
from dlm_jax.errors import UserError
from dlm_jax.families import registry
from dlm_jax.families.base import Family, Sampler
from dlm_jax.families.cosmos_ae import CosmosAE
from dlm_jax.models.cosmos import LatentDenoiser
from dlm_jax.models.transformer import TransformerConfig
from dlm_jax.sampling import cosmos as cosmos_sampling
from dlm_jax.sampling.loop import SampleSpec

Array = jax.Array


def _check(family: Cosmos, spec: SampleSpec, template: Any) -> None:
    del template
    seq_len = family.config.data.seq_len
    if spec.length > seq_len:
        raise UserError(f"the autoencoder decodes data.seq_len={seq_len} tokens; cannot sample {spec.length} "
                        "(lower --length)")
    opts = spec.options
    if not 0.0 < opts.t_min < 1.0:
        raise UserError(f"--sampler.t_min must be in (0, 1), got {opts.t_min}")
    if not (np.isfinite(opts.prompt_guidance) and opts.prompt_guidance >= 0):
        raise UserError(f"--sampler.prompt_guidance must be a finite number >= 0, got {opts.prompt_guidance}")


def _sample(family: Cosmos, params, rng: Array, spec: SampleSpec, template: Any):
    def denoiser(z, t, x0_sc):
        return family.model.apply({"params": params}, z, t, x0_sc)

    return cosmos_sampling.sample(denoiser, family.decode_logits, rng, np.asarray(template), spec,
                                  family.schedule, family.autoencoder.latent_shape, family.model.self_condition)


@registry.register
class Cosmos(Family):
    """Latent diffusion over a frozen cosmos_ae's latents: x0-prediction MSE on the VP tan-d schedule."""

    name: ClassVar[str] = "cosmos"
    metric_name: ClassVar[str | None] = None
    component_families: ClassVar[dict[str, tuple[str, ...]]] = {"autoencoder": ("cosmos_ae",)}
    shape_keys: ClassVar[tuple[str, ...]] = ("self_condition",)
    samplers: ClassVar[dict[str, Sampler]] = {
        "cosmos": Sampler(_sample, cosmos_sampling.CosmosOptions, _check,
                          "N(0, I) -> DDIM / DDPM steps 1 -> t_min with self-conditioning -> the AE's decoder"),
    }

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        s = ml_collections.ConfigDict()
        s.schedule_d = 5.0  # d of a_t = 1 / sqrt(1 + d^2 tan^2(pi t / 2)) (paper: 5; 7 for 64 latents)
        s.self_condition = 0.5  # P(training reads the model's own x0 estimate); 0: no self-conditioning input
        return s

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        c = config.cosmos
        if not (np.isfinite(c.schedule_d) and c.schedule_d > 0):
            raise UserError(f"cosmos.schedule_d must be a finite number > 0, got {c.schedule_d}")
        if not 0.0 <= c.self_condition <= 1.0:
            raise UserError(f"cosmos.self_condition must be in [0, 1], got {c.self_condition}")

    def __init__(self, config, tokenizer, components):
        super().__init__(config, tokenizer, components)
        component = components["autoencoder"]
        self.autoencoder: CosmosAE = component.family
        key = f"components.autoencoder.workdir={component.workdir!r}"
        if "latent_mean" not in self.autoencoder.stats:
            raise UserError(f"{key} has no latent statistics: its training did not finish; run its `dlm-jax train` "
                            "again (it resumes, and writes WORKDIR/statistics.npz at the last step)")
        ae_len = component.config.data.seq_len
        if config.data.seq_len != ae_len:
            raise UserError(f"data.seq_len={config.data.seq_len} differs from the autoencoder's ({ae_len}); set "
                            f"--config.data.seq_len={ae_len}")
        # the autoencoder's own components (its frozen encoder) are jit arguments too, not baked-in constants
        self.frozen.update({f"autoencoder/{k}": v for k, v in self.autoencoder.frozen.items()})
        cfg = dataclasses.replace(TransformerConfig.from_config(config.model, 1, "full"), time_conditioning=True)
        self.model = LatentDenoiser(cfg, self.autoencoder.latent_shape[1], self.section.self_condition > 0)
        self.schedule = gaussian.LatentSchedule("vp_tan", self.section.schedule_d)

    @property
    def ae(self) -> CosmosAE:
        """The autoencoder reading its params and components from this family's (bound) frozen dict."""
        return self.autoencoder.bind({k: self.frozen[f"autoencoder/{k}"] for k in self.autoencoder.frozen})

    def init_params(self, rng: Array) -> Any:
        z = jnp.zeros((1, *self.autoencoder.latent_shape))
        return self.model.init(rng, z, jnp.ones((1,)), z)["params"]

    def latents(self, tokens: Array, loss_mask: Array) -> Array:
        """z_0 [B, N, C]: the autoencoder's clean latents, normalised per (slot, channel); no gradient."""
        stats = self.autoencoder.stats
        z0 = self.ae.encode(self.frozen["autoencoder"], tokens, loss_mask)
        return jax.lax.stop_gradient(cosmos.standardize(z0, stats["latent_mean"], stats["latent_std"]))

    def decode_logits(self, x0: Array) -> Array:
        """Token logits [B, L, V] of normalised latents [B, N, C] (de-normalised, then the AE's decoder)."""
        stats = self.autoencoder.stats
        latents = cosmos.unstandardize(x0, stats["latent_mean"], stats["latent_std"])
        return self.ae.decode(self.frozen["autoencoder"], latents)[0]

    def loss(self, params, batch, rng, train):
        """Unweighted MSE of x0_hat against z_0 per row (rows without tokens do not count), t ~ U[0, 1]."""
        z0 = self.latents(batch["tokens"], batch["loss_mask"])
        n = z0.shape[0]
        rng_t, rng_noise, rng_sc, rng_dropout = jax.random.split(rng, 4)
        t = sample_times(rng_t, n, 0.0)
        z_t = gaussian.noisy_latent(z0, t, jax.random.normal(rng_noise, z0.shape), self.schedule)

        def denoiser(z, t, x0_sc):
            return self.model.apply({"params": params}, z, t, x0_sc, deterministic=not train,
                                    rngs={"dropout": rng_dropout})

        p = self.section.self_condition if train else 0.0  # eval: the plain (first-pass) prediction
        x0_hat = cosmos.self_conditioned_x0(denoiser, z_t, t, rng_sc, p)
        rows = (batch["loss_mask"].sum(axis=1) > 0).astype(jnp.float32)
        mse = jnp.square(x0_hat - z0).mean(axis=(1, 2))
        loss = (mse * rows).sum() / jnp.maximum(rows.sum(), 1.0)
        late = rows * (t > 0.5)  # the noisier half of the times: where the prior's structure is learned
        return loss, {"mse": loss, "mse_t_above_half": (mse * late).sum() / jnp.maximum(late.sum(), 1.0)}
