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
from dlm_jax.errors import UserError
from dlm_jax.models.transformer import Transformer, TransformerConfig, init_cache
from dlm_jax.sampling import autoregressive as ar_sampling
from dlm_jax.sampling import masked as masked_sampling

Array = jax.Array
Params = Any


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family. `loss_terms` returns summed nll (nats) and token count so batches pool exactly."""

    name: str
    mask_mode: str  # attention mask of the backbone
    num_extra_tokens: int  # ids appended after the tokenizer's vocabulary (MDLM: [MASK])
    loss_terms: Callable[..., dict[str, Array]]  # (model, params, batch, rng, config, train) -> terms
    samplers: tuple[str, ...]  # sampler names; the first is the default
    check_sample: Callable[..., None]  # (model, config, spec, template) -> None or a one-line UserError
    sample: Callable[..., tuple[Array, dict[str, Array]]]  # (model, params, rng, config, spec, template)
    metric_name: str  # what eval reports: "nelbo" (an upper bound on the NLL) or "nll"


def _apply(model: Transformer, params: Params, rng: Array, train: bool) -> Callable[..., Array]:
    def logits_fn(tokens: Array, t: Array | None = None) -> Array:
        return model.apply({"params": params}, tokens, t, deterministic=not train, rngs={"dropout": rng})

    return logits_fn


def _mdlm_loss_terms(model, params, batch, rng, config, train):
    rng_noise, rng_dropout = jax.random.split(rng)
    return masked.nelbo_terms(
        _apply(model, params, rng_dropout, train), batch["tokens"], batch["loss_mask"], rng_noise, config.model,
        mask_id=model.cfg.vocab_size - 1,
    )


def _mdlm_check(model, config, spec, template):
    del template
    masked_sampling.check_spec(spec, model.cfg.time_conditioning)


def _mdlm_sample(model, params, rng, config, spec, template):
    """template: numpy int [L], -1 where tokens are generated."""
    mask_id = model.cfg.vocab_size - 1
    return masked_sampling.sample(
        _apply(model, params, rng, train=False), rng, jnp.where(jnp.asarray(template) < 0, mask_id, template), spec,
        mask_id=mask_id, schedule=masked.schedule_from_config(config.model), t_eps=config.model.t_eps,
    )


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

    def decode_fn(tokens, cache, index):
        return model.apply({"params": params}, tokens, cache=cache, cache_index=index)

    cache = init_cache(model.cfg, spec.num_samples, template.shape[0])
    return ar_sampling.sample_cached(decode_fn, cache, rng, template, spec, model.bos_id, num_prompt)


FAMILIES: dict[str, Family] = {
    "mdlm": Family("mdlm", "full", 1, _mdlm_loss_terms, masked_sampling.SAMPLERS, _mdlm_check, _mdlm_sample, "nelbo"),
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
