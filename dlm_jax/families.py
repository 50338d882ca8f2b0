"""The family registry: how each model family builds its backbone, computes its loss and samples.

The train loop, checkpointing, eval and CLI only talk to a `Family`, so they never branch on
`config.model.family`. A new family adds one entry to `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dlm_jax.diffusion import autoregressive, masked
from dlm_jax.diffusion import block as block_diffusion
from dlm_jax.errors import UserError
from dlm_jax.models.transformer import Transformer, TransformerConfig, init_cache
from dlm_jax.sampling import autoregressive as ar_sampling
from dlm_jax.sampling import block as block_sampling
from dlm_jax.sampling import masked as masked_sampling

Array = jax.Array
Params = Any


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family. `loss_terms` returns summed nll (nats) and token count so batches pool exactly."""

    name: str
    mask_mode: str  # attention mask of the backbone in training
    num_extra_tokens: int  # ids appended after the tokenizer's vocabulary (MDLM: [MASK])
    loss_terms: Callable[..., dict[str, Array]]  # (model, params, batch, rng, config, train) -> terms
    samplers: tuple[str, ...]  # sampler names; the first is the default
    check_sample: Callable[..., None]  # (model, config, spec, template) -> None or a one-line UserError
    sample: Callable[..., tuple[Array, dict[str, Array]]]  # (model, params, rng, config, spec, template)
    metric_name: str  # what eval reports: "nelbo" (an upper bound on the NLL) or "nll"
    # optional eval extras: per-sequence arrays from one val batch, then their summary (block: the clip search)
    eval_terms: Callable[..., dict[str, Array]] | None = None  # (model, params, batch, rng, config) -> arrays
    eval_summary: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def _apply(model: Transformer, params: Params, rng: Array, train: bool) -> Callable[..., Array]:
    def logits_fn(tokens: Array, t: Array | None = None, **kwargs) -> Array:
        return model.apply({"params": params}, tokens, t, deterministic=not train, rngs={"dropout": rng}, **kwargs)

    return logits_fn


def _decode_fn(model: Transformer, params: Params):
    """(tokens, t, cache, index, valid=None) -> (logits, cache): the backbone on a block against a KV cache."""

    def decode_fn(tokens, t, cache, index, valid=None):
        return model.apply({"params": params}, tokens, t, cache=cache, cache_index=index, cache_len=valid)

    return decode_fn


def _mask_id(model: Transformer) -> int:
    return model.cfg.vocab_size - 1


def _masked_sampling(model, config, spec) -> masked_sampling.MaskedSampling:
    return masked_sampling.MaskedSampling(spec, _mask_id(model), masked.schedule_from_config(config.model),
                                          config.model.t_eps)


def _masked_template(model, template) -> Array:
    return jnp.where(jnp.asarray(template) < 0, _mask_id(model), jnp.asarray(template))


def _check_blocks(spec, block: int, what: str) -> None:
    if spec.length % block:
        raise UserError(f"{spec.sampler}: length {spec.length} is not divisible by the {what} {block}")
    if spec.steps < spec.length // block:
        raise UserError(f"{spec.sampler}: steps={spec.steps} is fewer than the {spec.length // block} blocks")


# ---------------------------------------------------------------------------------------------- mdlm

APPROX_CACHE_SAMPLERS = ("prefix_cache", "dual_cache")


def _mdlm_loss_terms(model, params, batch, rng, config, train):
    rng_noise, rng_dropout = jax.random.split(rng)
    return masked.nelbo_terms(
        _apply(model, params, rng_dropout, train), batch["tokens"], batch["loss_mask"], rng_noise, config.model,
        mask_id=_mask_id(model),
    )


def _mdlm_check(model, config, spec, template):
    del template
    if spec.sampler in APPROX_CACHE_SAMPLERS:
        masked_sampling.check_spec(dataclasses.replace(spec, sampler=spec.inner), model.cfg.time_conditioning)
        _check_blocks(spec, masked_sampling.semi_ar_block_length(spec), "block length")
    else:
        masked_sampling.check_spec(spec, model.cfg.time_conditioning)


def _mdlm_sample(model, params, rng, config, spec, template):
    """template: numpy int [L], -1 where tokens are generated."""
    ms = _masked_sampling(model, config, spec)
    if spec.sampler in APPROX_CACHE_SAMPLERS:
        return block_sampling.approx_cache_sample(
            _decode_fn(model, params), lambda n: init_cache(model.cfg, spec.num_samples, n), rng,
            _masked_template(model, template), spec, ms, masked_sampling.semi_ar_block_length(spec),
            dual=spec.sampler == "dual_cache")
    return masked_sampling.sample(_apply(model, params, rng, train=False), rng, _masked_template(model, template),
                                  spec, mask_id=ms.mask_id, schedule=ms.schedule, t_eps=ms.t_eps)


# ---------------------------------------------------------------------------------------------- block


def _block_loss_terms(model, params, batch, rng, config, train):
    rng_noise, rng_dropout = jax.random.split(rng)
    logits_fn = _apply(model, params, rng_dropout, train)
    beta, omega = (config.model.clip_beta, config.model.clip_omega) if train else (config.model.t_eps, 1.0)
    terms = block_diffusion.nelbo_terms(
        lambda tokens, positions: logits_fn(tokens, positions=positions), batch["tokens"], batch["loss_mask"],
        rng_noise, masked.schedule_from_config(config.model), model.cfg.block_size, _mask_id(model), beta, omega,
        config.model.antithetic)
    del terms["per_sequence"]
    return terms


def _block_eval_terms(model, params, batch, rng, config):
    """Per-sequence loss estimates under every (beta, omega) candidate (BD3-LM's variance-minimizing search)."""
    logits_fn = _apply(model, params, rng, train=False)
    schedule = masked.schedule_from_config(config.model)
    out = {}
    for beta, omega in block_diffusion.CLIP_CANDIDATES:
        terms = block_diffusion.nelbo_terms(
            lambda tokens, positions: logits_fn(tokens, positions=positions), batch["tokens"], batch["loss_mask"],
            rng, schedule, model.cfg.block_size, _mask_id(model), beta, omega, config.model.antithetic)
        out[f"{beta}:{omega}"] = terms["per_sequence"] / jnp.maximum(batch["loss_mask"].sum(axis=1), 1.0)
    return out


def _block_eval_summary(per_sequence: dict[str, Any]) -> dict[str, Any]:
    candidates = {tuple(float(x) for x in key.split(":")): v for key, v in per_sequence.items()}
    (beta, omega), variances = block_diffusion.best_clip(candidates)
    return {"clip_best_beta": beta, "clip_best_omega": omega, "clip_variances": variances}


def _block_check(model, config, spec, template):
    del config, template
    if spec.sampler not in BLOCK_SAMPLERS:
        raise UserError(f"unknown sampler {spec.sampler!r} for a block diffusion model; choose one of "
                        f"{', '.join(BLOCK_SAMPLERS)}")
    masked_sampling.check_spec(dataclasses.replace(spec, sampler=spec.inner), time_conditioned=False)
    _check_blocks(spec, model.cfg.block_size, "block size")


def _block_sample(model, params, rng, config, spec, template):
    ms = _masked_sampling(model, config, spec)
    template = _masked_template(model, template)
    if spec.sampler == "block_nocache":
        full = _apply(model, params, rng, train=False)
        return block_sampling.block_sample(None, lambda tokens, t: full(tokens, t, mask_mode="block_causal"), None,
                                           rng, template, spec, ms, model.cfg.block_size)
    cache = init_cache(model.cfg, spec.num_samples, template.shape[0])
    return block_sampling.block_sample(_decode_fn(model, params), None, cache, rng, template, spec, ms,
                                       model.cfg.block_size)


BLOCK_SAMPLERS = ("block", "block_nocache")


# ---------------------------------------------------------------------------------------------- ar


def _ar_loss_terms(model, params, batch, rng, config, train):
    del config
    return autoregressive.nll_terms(
        _apply(model, params, rng, train), batch["tokens"], batch["loss_mask"], bos_id=model.bos_id
    )


def _ar_check(model, config, spec, template):
    if spec.sampler not in ar_sampling.SAMPLERS:
        raise UserError(f"unknown sampler {spec.sampler!r} for an AR model; choose one of "
                        f"{', '.join(ar_sampling.SAMPLERS)}")
    ar_sampling.check_prompt(template)


def _ar_sample(model, params, rng, config, spec, template):
    num_prompt = ar_sampling.check_prompt(template)
    template = jnp.asarray(template)
    if spec.sampler == "ar_nocache":
        return ar_sampling.sample_nocache(_apply(model, params, rng, train=False), rng, template, spec,
                                          model.bos_id, num_prompt)
    decode = _decode_fn(model, params)
    cache = init_cache(model.cfg, spec.num_samples, template.shape[0])
    return ar_sampling.sample_cached(lambda tokens, cache, index: decode(tokens, None, cache, index), cache, rng,
                                     template, spec, model.bos_id, num_prompt)


FAMILIES: dict[str, Family] = {
    "mdlm": Family("mdlm", "full", 1, _mdlm_loss_terms, masked_sampling.SAMPLERS + APPROX_CACHE_SAMPLERS,
                   _mdlm_check, _mdlm_sample, "nelbo"),
    "block": Family("block", "bd3_train", 1, _block_loss_terms, BLOCK_SAMPLERS, _block_check, _block_sample,
                    "nelbo", _block_eval_terms, _block_eval_summary),
    "ar": Family("ar", "causal", 0, _ar_loss_terms, ar_sampling.SAMPLERS, _ar_check, _ar_sample, "nll"),
}


class LanguageModel(Transformer):
    """The backbone plus the tokenizer ids a family needs (BOS for AR)."""

    bos_id: int = 0


def build(config: ml_collections.ConfigDict, vocab_size: int, bos_id: int) -> tuple[Family, LanguageModel]:
    """The family of `config.model.family` and its backbone for a tokenizer with `vocab_size` ids."""
    family = FAMILIES[config.model.family]
    cfg = TransformerConfig.from_config(config.model, vocab_size + family.num_extra_tokens, family.mask_mode)
    return family, LanguageModel(cfg, bos_id=bos_id)
