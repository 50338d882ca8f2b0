"""Block diffusion (BD3-LM): masked diffusion inside blocks of L', autoregressive across them (DESIGN.md section 4)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from dlm_jax.diffusion import block as block_diffusion
from dlm_jax.errors import UserError
from dlm_jax.families import registry
from dlm_jax.families.base import Sampler
from dlm_jax.families.mdlm import MaskedFamily, masked_process_section, speculative_samplers
from dlm_jax.sampling import block as block_sampling
from dlm_jax.sampling import masked as masked_sampling
from dlm_jax.sampling import speculative
from dlm_jax.sampling.loop import SampleSpec

Array = jax.Array


def _check(family: Block, spec: SampleSpec, template: Any) -> None:
    del template
    masked_sampling.check_runner(spec, time_conditioned=False)
    masked_sampling.check_blocks(spec.sampler, spec.length, family.block_size(), spec.steps, "block size")
    if spec.sampler == "block" and spec.options.window:
        raise UserError("--sampler.window re-positions the context for every block, which the exact KV cache of "
                        "--sampler=block cannot; use --sampler=block_nocache")
    masked_sampling.check_window(spec, family.block_size(), family.config.data.seq_len)


def _sample(family: Block, params, rng: Array, spec: SampleSpec, template: Any):
    ms = family.masked_sampling(spec)
    template = family.masked_template(template)
    if spec.sampler == "block_nocache":
        full = family.logits_fn(params, rng, train=False)
        return block_sampling.block_sample(None, lambda tokens, t: full(tokens, t, mask_mode="block_causal"), None,
                                           rng, template, spec, ms, family.block_size(), family.tokenizer.eos_id)
    cache = family.empty_cache(spec.num_samples, template.shape[0])
    return block_sampling.block_sample(family.decode_fn(params), None, cache, rng, template, spec, ms,
                                       family.block_size(), family.tokenizer.eos_id)


def _sample_freedave(family: Block, params, rng: Array, spec: SampleSpec, template: Any):
    """FreeDave against the exact KV cache of the finished blocks (`freedave_nocache`: the same tokens)."""
    cache = family.empty_cache(spec.num_samples, template.shape[0])
    return speculative.freedave_cached(family.decode_fn(params), cache, rng, family.masked_template(template), spec,
                                       family.mask_id, family.block_size())


_SPECULATIVE = speculative_samplers(speculative.FreeDaveOptions)


@registry.register
class Block(MaskedFamily):
    """BD3-LM: per-block t, one pass over x_t (+) x_0 with the bd3_train mask, clipped schedules."""

    name: ClassVar[str] = "block"
    mask_mode: ClassVar[str] = "bd3_train"
    samplers: ClassVar[dict[str, Sampler]] = {
        "block": Sampler(_sample, block_sampling.BlockOptions, _check,
                         "block by block against the exact KV cache of the finished blocks"),
        "block_nocache": Sampler(_sample, block_sampling.BlockOptions, _check,
                                 "the same draws, a full block-causal forward per step (no cache)"),
        **_SPECULATIVE,
        "freedave": dataclasses.replace(
            _SPECULATIVE["freedave"], fn=_sample_freedave,
            doc="FreeDave: greedy one-token-per-step block decoding, k drafts of the current block verified per "
                "batched forward against the exact KV cache: the same tokens in fewer forwards (--temperature unused)"),
        "freedave_nocache": dataclasses.replace(
            _SPECULATIVE["freedave"], doc="FreeDave without the cache: every forward over the whole sequence, drafts "
                                          "may reach into later blocks (the same tokens)"),
    }

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        s = masked_process_section()
        s.block_size = 4  # L': tokens per block (1: AR, data.seq_len: MDLM)
        s.clip_beta = 0.45  # training mask rates ~ U[beta, omega] (clipped schedule); eval uses U[t_eps, 1]
        s.clip_omega = 0.95
        s.resample = False  # training: re-draw blocks whose realised masked fraction is outside [beta, omega]
        return s

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        super().validate(config)
        b, d = config.block, config.data
        if b.block_size < 1 or d.seq_len % b.block_size:
            raise UserError(f"data.seq_len={d.seq_len} is not divisible by block.block_size={b.block_size}")
        if config.model.time_conditioning:
            raise UserError("block diffusion gives every block its own t: set model.time_conditioning=False")
        if not 0.0 < b.clip_beta < b.clip_omega <= 1.0:
            raise UserError(f"need 0 < block.clip_beta < block.clip_omega <= 1, got {b.clip_beta}, {b.clip_omega}")
        if d.packing == "pad":
            raise UserError("block diffusion trains on packed rows: set data.packing=wrap")
        if b.resample and not any(b.clip_beta - 1e-6 <= k / b.block_size <= b.clip_omega + 1e-6
                                  for k in range(b.block_size + 1)):
            raise UserError(f"block.resample: no block of {b.block_size} tokens can have a masked fraction in "
                            f"[{b.clip_beta}, {b.clip_omega}]; widen block.clip_beta/clip_omega or resample=False")

    def block_size(self) -> int:
        return self.config.block.block_size

    def sequence_forward(self, params, rng: Array) -> masked_sampling.LogitsFn:
        full = self.logits_fn(params, rng, train=False)
        return lambda tokens, t: full(tokens, t, mask_mode="block_causal")

    def decoding_block(self, spec: SampleSpec) -> int:
        return self.block_size()

    def _nelbo_terms(self, params, batch, rng, beta: float, omega: float, train: bool):
        logits_fn = self.logits_fn(params, rng[1], train)
        return block_diffusion.nelbo_terms(
            lambda tokens, positions: logits_fn(tokens, positions=positions), batch["tokens"], batch["loss_mask"],
            rng[0], self.schedule, self.block_size(), self.mask_id, beta, omega, self.section.antithetic,
            resample=train and self.section.resample)

    def loss_terms(self, params, batch, rng, train):
        beta, omega = (self.section.clip_beta, self.section.clip_omega) if train else (self.section.t_eps, 1.0)
        terms = self._nelbo_terms(params, batch, jax.random.split(rng), beta, omega, train)
        del terms["per_block"]
        return terms

    def eval_terms(self, params, batch, rng):
        """Per-block loss estimates [B, nb] under every (beta, omega) of BD3-LM's search grid (one `lax.map`)."""
        grid = block_diffusion.clip_search_grid(self.section.t_eps)

        def per_block(interval: jax.Array) -> jax.Array:
            return self._nelbo_terms(params, batch, (rng, rng), interval[0], interval[1], train=False)["per_block"]

        estimates = jax.lax.map(per_block, jnp.asarray(grid, jnp.float32))  # [C, B, nb]
        return {f"{beta}:{omega}": estimates[i] for i, (beta, omega) in enumerate(grid)}

    def eval_summary(self, per_block: dict[str, Any]) -> dict[str, Any]:
        candidates = {tuple(float(x) for x in key.split(":")): v for key, v in per_block.items()}
        (beta, omega), variances = block_diffusion.best_clip(candidates)
        return {"clip_best_beta": beta, "clip_best_omega": omega, "clip_variances": variances}
