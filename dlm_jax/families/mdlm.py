"""MDLM / MD4: masked (absorbing-state) diffusion on the full-attention backbone (DESIGN.md section 3).

Adapted from an AR (Dream, Ye et al. 2025; DiffuLLaMA, Gong et al. 2024): `shift_logits` keeps the AR's output
alignment (z_l is predicted from the backbone's output at l - 1 on [BOS] + z_t) and `anneal_steps` anneals the
training attention from causal to full (docs/fast_decoding.md, "MDLM adapted from AR").

`MaskedFamily` is what every [MASK]-based token family shares (the [MASK] id, the masking schedule section,
templates for the masked samplers); block diffusion builds on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax.config import choice
from dlm_jax.diffusion import autoregressive, masked
from dlm_jax.errors import UserError
from dlm_jax.families import registry
from dlm_jax.families.base import Component, Params, Sampler, TransformerFamily
from dlm_jax.kernels import reference
from dlm_jax.sampling import block as block_sampling
from dlm_jax.sampling import masked as masked_sampling
from dlm_jax.sampling import speculative
from dlm_jax.sampling.loop import NoOptions, SampleSpec

Array = jax.Array


def masked_process_section() -> ml_collections.ConfigDict:
    """The keys of a masked forward process (MDLM / MD4 schedules), shared by the masked families' sections."""
    s = ml_collections.ConfigDict()
    s.schedule = "linear"  # linear | cosine | poly
    s.schedule_power = 2.0  # k for poly: alpha_t = 1 - t^k
    s.t_eps = 1e-3  # t ~ U[t_eps, 1]; samplers stop at t_eps
    s.antithetic = True  # antithetic times over the batch
    return s


class MaskedFamily(TransformerFamily):
    """A token family with a [MASK] id appended to the vocabulary and a masking schedule in its section."""

    num_extra_tokens: ClassVar[int] = 1

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        section = config[cls.name]
        choice(f"{cls.name}.schedule", section.schedule, ("linear", "cosine", "poly"))
        if not 0.0 < section.t_eps < 1.0:
            raise UserError(f"{cls.name}.t_eps must be in (0, 1), got {section.t_eps}")

    @property
    def schedule(self) -> masked.MaskSchedule:
        return masked.schedule_from_config(self.section)

    def masked_sampling(self, spec: SampleSpec) -> masked_sampling.MaskedSampling:
        return masked_sampling.MaskedSampling(spec, self.mask_id, self.schedule, self.section.t_eps)

    def masked_template(self, template: Any) -> Array:
        """The template with [MASK] where it is -1 (to be generated)."""
        return jnp.where(jnp.asarray(template) < 0, self.mask_id, jnp.asarray(template))

    def sequence_forward(self, params: Params, rng: Array) -> masked_sampling.LogitsFn:
        """(z [N, L], t [N]) -> logits [N, L, V+1]: one forward over the whole sequence (the speculative samplers')."""
        return self.logits_fn(params, rng, train=False)

    def decoding_block(self, spec: SampleSpec) -> int:
        """Tokens per left-to-right block of greedy semi-AR decoding (FreeDave's target)."""
        return masked_sampling.semi_ar_block_length(spec)


# ---------------------------------------------------------------------------------------------- samplers


def _check_rule(family: MDLM, spec: SampleSpec, template: Any) -> None:
    del template
    masked_sampling.check_spec(spec, family.model.cfg.time_conditioning, family.config.data.seq_len)


def _check_fast_dllm(family: MDLM, spec: SampleSpec, template: Any) -> None:
    del template
    if family.section.shift_logits:
        raise UserError(f"{spec.sampler} indexes its KV caches by position, and a model with mdlm.shift_logits=true "
                        "reads every position one later ([BOS] first); use --sampler=semi_ar")
    if family.model.cfg.time_conditioning:
        raise UserError(f"{spec.sampler} reuses K/V computed at the block's start time for every later step: it "
                        "needs a model trained with model.time_conditioning=False; use --sampler=semi_ar")
    masked_sampling.check_runner(spec, family.model.cfg.time_conditioning)
    if spec.option("refresh_every", 0) < 0:
        raise UserError(f"--sampler.refresh_every={spec.options.refresh_every} must be >= 0 (0: never refresh)")
    masked_sampling.check_blocks(spec.sampler, spec.length, masked_sampling.semi_ar_block_length(spec), spec.steps)
    masked_sampling.check_window(spec, masked_sampling.semi_ar_block_length(spec), family.config.data.seq_len)


def _sample_rule(family: MDLM, params, rng: Array, spec: SampleSpec, template: Any):
    """ancestral, cached, first_hitting, topk_confidence, semi_ar (sampling/masked.py); semi_ar with a context
    window runs block by block through `block_sample`'s sliding window (sampling/block.py)."""
    if spec.option("window", 0):
        return block_sampling.block_sample(None, family.logits_fn(params, rng, train=False), None, rng,
                                           family.masked_template(template), spec, family.masked_sampling(spec),
                                           masked_sampling.semi_ar_block_length(spec), family.tokenizer.eos_id)
    return masked_sampling.sample(family.logits_fn(params, rng, train=False), rng, family.masked_template(template),
                                  spec, mask_id=family.mask_id, schedule=family.schedule, t_eps=family.section.t_eps)


def _sample_fast_dllm(family: MDLM, params, rng: Array, spec: SampleSpec, template: Any):
    """prefix_cache / dual_cache: Fast-dLLM's approximate KV caches; dkv_cache: dKV-Cache's (sampling/block.py)."""
    return block_sampling.approx_cache_sample(
        family.decode_fn(params), lambda n: family.empty_cache(spec.num_samples, n), rng,
        family.masked_template(template), spec, family.masked_sampling(spec),
        masked_sampling.semi_ar_block_length(spec), mode=spec.sampler.removesuffix("_cache"))


def _rule(doc: str, options: type = NoOptions) -> Sampler:
    return Sampler(_sample_rule, options, _check_rule, doc)


def _fast_dllm(doc: str, options: type = masked_sampling.SemiAROptions) -> Sampler:
    return Sampler(_sample_fast_dllm, options, _check_fast_dllm, doc)


def _check_freedave(family: MaskedFamily, spec: SampleSpec, template: Any) -> None:
    del template
    speculative.check_freedave(spec, family.decoding_block(spec), family.config.data.seq_len)


def _sample_freedave(family: MaskedFamily, params, rng: Array, spec: SampleSpec, template: Any):
    return speculative.freedave(family.sequence_forward(params, rng), rng, family.masked_template(template), spec,
                                family.mask_id, family.decoding_block(spec))


def _verifier(family: MaskedFamily, spec: SampleSpec) -> Component:
    workdir = spec.options.verifier
    if not workdir:
        raise UserError(f"{spec.sampler} needs --sampler.verifier=WORKDIR: a trained `ar` model with this tokenizer")
    component = family.components.get("verifier")
    if component is None or component.workdir != workdir:
        raise UserError(f"--sampler.verifier={workdir!r} is not loaded: experiment.load_sampler_components loads it")
    return component


def _check_diffuspec(family: MaskedFamily, spec: SampleSpec, template: Any) -> None:
    verifier = _verifier(family, spec)
    speculative.check_diffuspec(spec, template, family.block_size(), family.config.data.seq_len,
                                verifier.config.data.seq_len)


def _sample_diffuspec(family: MaskedFamily, params, rng: Array, spec: SampleSpec, template: Any):
    ar = _verifier(family, spec).family
    decode = ar.decode_fn(family.frozen["verifier"])  # params: a jit argument (Family.bind)
    return speculative.diffuspec(family.sequence_forward(params, rng), lambda x, cache, i: decode(x, None, cache, i),
                                 ar.empty_cache, rng, np.asarray(template), spec, family.mask_id, ar.bos_id)


def speculative_samplers(freedave_options: type) -> dict[str, Sampler]:
    """The lossless speculative samplers of a masked family's table (sampling/speculative.py)."""
    return {
        "freedave": Sampler(_sample_freedave, freedave_options, _check_freedave,
                            "FreeDave: greedy one-token-per-step semi-AR decoding, k drafts verified per batched "
                            "forward: the same tokens in fewer forwards (--temperature unused)"),
        "diffuspec": Sampler(_sample_diffuspec, speculative.DiffuSpecOptions, _check_diffuspec,
                             "DiffuSpec: this model drafts k tokens, an AR (--sampler.verifier) keeps a prefix by "
                             "speculative sampling: exactly the AR's distribution",
                             components=(("verifier", ("ar",)),)),
    }


@registry.register
class MDLM(MaskedFamily):
    """Masked diffusion: continuous- or discrete-time NELBO with SUBS, full attention."""

    name: ClassVar[str] = "mdlm"
    mask_mode: ClassVar[str] = "full"
    reading_keys: ClassVar[tuple[str, ...]] = ("shift_logits",)
    samplers: ClassVar[dict[str, Sampler]] = {
        "ancestral": _rule("MDLM reverse process on the grid t: 1 -> eps, then one argmax pass",
                           masked_sampling.AncestralOptions),
        "cached": _rule("ancestral, with the forward skipped while nothing changed (t-agnostic models)",
                        masked_sampling.AncestralOptions),
        "first_hitting": _rule("one token per forward at its first-hitting time (--steps unused)"),
        "topk_confidence": _rule("MaskGIT / LLaDA: commit the k most confident tokens per step",
                                 masked_sampling.TopkOptions),
        "semi_ar": _rule("blocks left to right, a masked rule inside each (--sampler.window: past data.seq_len)",
                         masked_sampling.SlidingSemiAROptions),
        "prefix_cache": _fast_dllm("Fast-dLLM prefix cache: semi-AR blocks against a cached prefix"),
        "dual_cache": _fast_dllm("Fast-dLLM dual cache: the block against cached prefix and (stale) suffix"),
        "dkv_cache": _fast_dllm("dKV-Cache: semi-AR blocks, a block's K/V cached from the forward after it is done, "
                                "refreshed every --sampler.refresh_every blocks", block_sampling.DelayedCacheOptions),
        **speculative_samplers(speculative.SemiARFreeDaveOptions),
    }

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        s = masked_process_section()
        s.num_timesteps = 0  # 0: continuous-time NELBO; T > 0: discrete-time T-step NELBO
        s.schedule_shift = 0.0  # MD4's eps > 0: alpha = (1 - 2 eps) alpha + eps, t ~ U[0, 1], + eps log V recon term
        s.shift_logits = False  # AR alignment (Dream / DiffuLLaMA): logits of z_l from the output at l - 1 on [BOS] + z
        s.anneal_steps = 0  # DiffuLLaMA: training attention causal OR random pairs w.p. step / anneal_steps, then full
        return s

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        super().validate(config)
        if config.mdlm.num_timesteps < 0:
            raise UserError(f"mdlm.num_timesteps must be >= 0 (0 = continuous time), got {config.mdlm.num_timesteps}")
        if not 0.0 <= config.mdlm.schedule_shift < 0.5:
            raise UserError(f"mdlm.schedule_shift must be in [0, 0.5) (MD4: 1e-4), got {config.mdlm.schedule_shift}")
        if config.mdlm.anneal_steps < 0:
            raise UserError(f"mdlm.anneal_steps must be >= 0 (0: full attention from the start), got "
                            f"{config.mdlm.anneal_steps}")
        if config.mdlm.anneal_steps and config.model.attention_impl not in ("auto", "xla"):
            raise UserError(f"mdlm.anneal_steps > 0 draws random attention masks, which run on attention_impl auto or "
                            f"xla only; got model.attention_impl={config.model.attention_impl!r}")

    def logits_fn(self, params: Params, rng: Array, train: bool, step: Array | None = None) -> Callable[..., Array]:
        """(z [B, L], t [B] | None) -> logits [B, L, V+1]. With `shift_logits` the backbone reads [BOS] + z and
        z_l's logits are its output at l - 1 (an AR's alignment). In training, given the optimizer `step` <
        anneal_steps, attention is DiffuLLaMA's causal OR random pairs w.p. step / anneal_steps; else full."""
        backbone = super().logits_fn(params, rng, train)
        shift, anneal_steps = self.section.shift_logits, self.section.anneal_steps
        anneal = train and anneal_steps > 0 and step is not None

        def logits(tokens: Array, t: Array | None = None, **kwargs) -> Array:
            x = autoregressive.prepend_bos(tokens, self.bos_id) if shift else tokens  # [B, L + shift]
            if anneal:
                mask = reference.anneal_mask(jax.random.fold_in(rng, 1), step / anneal_steps, x.shape[1])
                out = jax.lax.cond(step < anneal_steps, lambda: backbone(x, t, attention_mask=mask, **kwargs),
                                   lambda: backbone(x, t, **kwargs))
            else:
                out = backbone(x, t, **kwargs)
            return out[:, :-1] if shift else out

        return logits

    def loss_terms(self, params, batch, rng, train):
        rng_noise, rng_dropout = jax.random.split(rng)
        return masked.nelbo_terms(self.logits_fn(params, rng_dropout, train, batch.get("step")), batch["tokens"],
                                  batch["loss_mask"], rng_noise, self.section, mask_id=self.mask_id)
