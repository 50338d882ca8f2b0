"""Cosmos stage 1: the compressed latent autoencoder (Meshchaninov et al. 2025; DESIGN.md section 7, docs/cosmos.md).

Encoder states (`cosmos_ae.encoder=frozen`: the final normed hidden states of the frozen `encoder` component, an
mdlm read at t = 0 with nothing masked or an ar, standardised per channel with statistics of training tokens fit
before the first step; `embeddings`: trainable token embeddings) -> N = seq_len / compression latents ->
L decoder slots -> token logits (+ hidden states against the standardised encoder states). Loss = CE +
mse_weight x MSE; augmentations on disjoint halves of each training batch (`diffusion/cosmos.py`). After the
last step the per-(slot, channel) mean / std of clean val latents are saved (WORKDIR/statistics.npz): what
stage 2 (`families/cosmos.py`) normalises with. Eval: reconstruction accuracy, clean and with noised latents.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax.config import choice
from dlm_jax.diffusion import cosmos
from dlm_jax.diffusion.common import token_nll
from dlm_jax.errors import UserError
from dlm_jax.families import registry
from dlm_jax.families.base import Family
from dlm_jax.models.cosmos import CosmosAutoencoder
from dlm_jax.models.transformer import TransformerConfig, hidden_states
from dlm_jax.sampling.loop import argmax_last

Array = jax.Array
ENCODERS = ("embeddings", "frozen")


def _accuracy_terms(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(correct tokens per row [B], row fully correct [B] as 0/1) over the loss_mask positions."""
    right = argmax_last(logits) == tokens
    wrong = ~right & (loss_mask > 0)
    return (right * loss_mask).sum(axis=1), (~wrong.any(axis=1)).astype(jnp.float32)


@registry.register
class CosmosAE(Family):
    """Stage 1 of Cosmos: text -> N latents -> text; metric_name None (eval: loss + reconstruction accuracy)."""

    name: ClassVar[str] = "cosmos_ae"
    metric_name: ClassVar[str | None] = None
    component_families: ClassVar[dict[str, tuple[str, ...]]] = {"encoder": ("ar", "mdlm")}
    shape_keys: ClassVar[tuple[str, ...]] = ("compression", "encoder", "qk_norm")
    no_sampler_hint: ClassVar[str] = ("; it is Cosmos's autoencoder (stage 1): train stage 2 on it with "
                                      "--config.model.family=cosmos --config.components.autoencoder.workdir=WORKDIR")

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        s = ml_collections.ConfigDict()
        s.compression = 4  # N = data.seq_len / compression latents (paper: 1, 2, 4, 8 for L = 128)
        s.encoder = "embeddings"  # embeddings: trainable token embeddings | frozen: components.encoder's states
        s.qk_norm = False  # RMSNorm on queries and keys of every cross-attention
        s.mse_weight = 1.0  # MSE(decoder hidden, standardised encoder states) (frozen encoder only)
        s.token_mask = 0.3  # first half of a batch: P(a position is dropped from the compressor's keys)
        s.mix_d = 0.7  # second half: latents h' = d h + sqrt(1 - d^2) eps (1: off)
        s.latent_dropout = 0.4  # second half, after mixing: P(a latent element is zeroed) (0: off)
        s.stats_batches = 16  # eval-size batches for the encoder (train split) and latent (val split) statistics
        s.eval_noise = (0.9, 0.7, 0.5)  # eval: accuracy also with latents mixed at these d
        return s

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        c = config.cosmos_ae
        choice("cosmos_ae.encoder", c.encoder, ENCODERS)
        if c.compression < 1 or config.data.seq_len % c.compression:
            raise UserError(f"cosmos_ae.compression={c.compression} must be >= 1 and divide data.seq_len="
                            f"{config.data.seq_len} (N = seq_len / compression latents)")
        for key in ("token_mask", "latent_dropout"):
            if not 0.0 <= c[key] < 1.0:
                raise UserError(f"cosmos_ae.{key} must be in [0, 1), got {c[key]}")
        for key, values in (("mix_d", (c.mix_d,)), ("eval_noise", tuple(c.eval_noise))):
            if not all(0.0 < d <= 1.0 for d in values):
                raise UserError(f"cosmos_ae.{key} must be in (0, 1] (1: no noise), got {c[key]}")
        if c.mse_weight < 0 or c.stats_batches < 1:
            raise UserError(f"cosmos_ae.mse_weight must be >= 0 and cosmos_ae.stats_batches >= 1, got "
                            f"{c.mse_weight}, {c.stats_batches}")

    @classmethod
    def needed_components(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return ("encoder",) if config.cosmos_ae.encoder == "frozen" else ()

    def __init__(self, config, tokenizer, components):
        super().__init__(config, tokenizer, components)
        c, seq_len = self.section, config.data.seq_len
        self.encoder = components["encoder"].family if "encoder" in components else None
        state_dim = self.encoder.model.cfg.d_model if self.encoder else 0
        cfg = TransformerConfig.from_config(config.model, tokenizer.vocab_size, "full")
        self.model = CosmosAutoencoder(cfg, seq_len, seq_len // c.compression, state_dim, c.qk_norm)
        # identity placeholders until the train loop fits them or use_statistics reads a workdir's (`dlm-jax compile`
        # lowers the train step with these; nothing trains or samples on them)
        self.stats: dict[str, np.ndarray] = ({"encoder_mean": np.zeros(state_dim, np.float32),
                                              "encoder_std": np.ones(state_dim, np.float32)} if state_dim else {})

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(N, D) of one text's latents."""
        return self.model.num_latents, self.model.cfg.d_model

    def use_statistics(self, stats: dict[str, np.ndarray], where: str) -> None:
        if self.encoder is not None and "encoder_mean" not in stats:
            raise UserError(f"{where} has no encoder statistics (statistics.npz): it was not trained with "
                            "cosmos_ae.encoder=frozen; retrain it or set the same cosmos_ae.encoder")
        self.stats = dict(stats)

    def init_params(self, rng: Array) -> Any:
        seq_len = self.config.data.seq_len
        inputs = (jnp.zeros((1, seq_len, self.model.state_dim)) if self.encoder
                  else jnp.zeros((1, seq_len), jnp.int32))
        return self.model.init(rng, inputs, jnp.ones((1, seq_len), bool))["params"]

    # -- the two halves ---------------------------------------------------------------------------------
    def encoder_states(self, tokens: Array) -> Array:
        """The frozen encoder's final normed hidden states [B, L, S] float32 (an mdlm reads them at t = 0)."""
        enc = self.encoder
        t = jnp.zeros((tokens.shape[0],)) if enc.model.cfg.time_conditioning else None
        return jax.lax.stop_gradient(hidden_states(enc.model, self.frozen["encoder"], tokens, t, 0)
                                     .astype(jnp.float32))

    def inputs(self, tokens: Array) -> Array:
        """What the compressor reads: standardised encoder states [B, L, S], or the tokens themselves."""
        if self.encoder is None:
            return tokens
        return cosmos.standardize(self.encoder_states(tokens), self.stats["encoder_mean"], self.stats["encoder_std"])

    def encode(self, params: Any, tokens: Array, loss_mask: Array) -> Array:
        """Clean latents [B, N, D] of tokens [B, L] (the compressor attends to the loss_mask positions)."""
        return self.model.apply({"params": params}, self.inputs(tokens), loss_mask > 0, method=CosmosAutoencoder.encode)

    def decode(self, params: Any, latents: Array) -> tuple[Array, Array | None]:
        """(logits [B, L, V], hidden [B, L, S] | None) of latents [B, N, D]."""
        return self.model.apply({"params": params}, latents, method=CosmosAutoencoder.decode)

    # -- training -------------------------------------------------------------------------------------
    def loss(self, params, batch, rng, train):
        """CE (+ mse_weight x MSE with a frozen encoder); in training the halves of the batch are augmented."""
        tokens, loss_mask = batch["tokens"], batch["loss_mask"]
        c, n = self.section, tokens.shape[0]
        rng_keep, rng_mix, rng_drop = jax.random.split(rng, 3)
        masked_rows = cosmos.first_half(n) if train else jnp.zeros((n,), bool)
        inputs = self.inputs(tokens)
        keep = cosmos.compressor_keep(rng_keep, loss_mask, masked_rows, c.token_mask)
        latents = self.model.apply({"params": params}, inputs, keep, method=CosmosAutoencoder.encode)
        if train:
            latents = cosmos.gaussian_mix(rng_mix, latents, ~masked_rows, c.mix_d)
            latents = cosmos.latent_dropout(rng_drop, latents, ~masked_rows, c.latent_dropout)
        logits, hidden = self.decode(params, latents)
        count = jnp.maximum(loss_mask.sum(), 1.0)
        ce = (token_nll(logits, tokens) * loss_mask).sum() / count
        correct, exact = _accuracy_terms(logits, tokens, loss_mask)
        metrics = {"ce": ce, "token_accuracy": correct.sum() / count, "sequence_accuracy": exact.mean()}
        loss = ce
        if hidden is not None:
            mse = (jnp.square(hidden - inputs).mean(axis=-1) * loss_mask).sum() / count
            loss, metrics["mse"] = loss + c.mse_weight * mse, mse
        if train:  # what each augmented half reconstructs
            for label, rows in (("token_masked", masked_rows), ("noised", ~masked_rows)):
                row_tokens = (loss_mask * rows[:, None]).sum()
                metrics[f"token_accuracy_{label}_half"] = (correct * rows).sum() / jnp.maximum(row_tokens, 1.0)
        return loss, metrics

    # -- eval: reconstruction, clean and with noised latents -------------------------------------------
    def eval_terms(self, params, batch, rng):
        """Per row [B]: correct tokens and exact reconstruction, clean and at every eval_noise d."""
        tokens, loss_mask = batch["tokens"], batch["loss_mask"]
        latents = self.encode(params, tokens, loss_mask)
        out = {"tokens": loss_mask.sum(axis=1)}
        every_row = jnp.ones((tokens.shape[0],), bool)
        for i, d in enumerate((1.0, *self.section.eval_noise)):
            noised = cosmos.gaussian_mix(jax.random.fold_in(rng, i), latents, every_row, d) if d < 1 else latents
            suffix = "" if d == 1.0 else f"_noised_d{d:g}"
            out[f"correct{suffix}"], out[f"exact{suffix}"] = _accuracy_terms(self.decode(params, noised)[0], tokens,
                                                                             loss_mask)
        return out

    def eval_summary(self, per_row: dict[str, Any]) -> dict[str, Any]:
        count = max(float(per_row["tokens"].sum()), 1.0)
        out = {}
        for key, values in per_row.items():
            if key.startswith("correct"):
                out["token_accuracy" + key[len("correct"):]] = float(values.sum()) / count
            elif key.startswith("exact"):
                out["sequence_accuracy" + key[len("exact"):]] = float(values.mean())
        return out

    # -- statistics -----------------------------------------------------------------------------------
    def _pooled_moments(self, sums_fn, batches, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of sums_fn(batch) = `diffusion/cosmos.py:moment_sums` pooled over stats_batches batches."""
        sums = [jax.device_get(sums_fn(b)) for b in itertools.islice(batches, self.section.stats_batches)]
        return cosmos.finish_moments(sums, name)

    def statistics_before_training(self, batches) -> dict[str, np.ndarray]:
        """Per-channel mean / std of the frozen encoder's states over training tokens (none without an encoder)."""
        if self.encoder is None:
            return {}
        fn = jax.jit(lambda frozen, b: cosmos.moment_sums(self.bind(frozen).encoder_states(b["tokens"]),
                                                          b["loss_mask"]))
        mean, std = self._pooled_moments(lambda b: fn(self.frozen, b), batches, "encoder")
        return {"encoder_mean": mean, "encoder_std": std}

    def statistics_after_training(self, params, batches) -> dict[str, np.ndarray]:
        """Per-(slot, channel) mean / std [N, D] of clean val latents."""
        fn = jax.jit(lambda params, frozen, b: cosmos.moment_sums(
            self.bind(frozen).encode(params, b["tokens"], b["loss_mask"]), b["loss_mask"].sum(axis=1) > 0))
        mean, std = self._pooled_moments(lambda b: fn(params, self.frozen, b), batches, "latent")
        print(f"cosmos_ae: latent statistics saved (mean |mean| {np.abs(mean).mean():.3f}, mean std {std.mean():.3f})")
        return {"latent_mean": mean, "latent_std": std}
