"""The autoregressive baseline on the same backbone (causal mask): baseline, Gen PPL judge, EDLM energy."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from dlm_jax.diffusion import autoregressive
from dlm_jax.families import registry
from dlm_jax.families.base import Sampler, TransformerFamily
from dlm_jax.sampling import autoregressive as ar_sampling
from dlm_jax.sampling.loop import SampleSpec

Array = jax.Array


def _check(family: AR, spec: SampleSpec, template: Any) -> None:
    del family, spec
    ar_sampling.check_prompt(template)


def _sample(family: AR, params, rng: Array, spec: SampleSpec, template: Any):
    num_prompt = ar_sampling.check_prompt(template)
    template = jnp.asarray(template)
    if spec.sampler == "ar_nocache":
        return ar_sampling.sample_nocache(family.logits_fn(params, rng, train=False), rng, template, spec,
                                          family.bos_id, num_prompt)
    decode = family.decode_fn(params)
    cache = family.empty_cache(spec.num_samples, template.shape[0])
    return ar_sampling.sample_cached(lambda tokens, cache, index: decode(tokens, None, cache, index), cache, rng,
                                     template, spec, family.bos_id, num_prompt)


@registry.register
class AR(TransformerFamily):
    """Next-token prediction on [BOS] + x[:-1]; eval reports the exact NLL."""

    name: ClassVar[str] = "ar"
    metric_name: ClassVar[str] = "nll"
    mask_mode: ClassVar[str] = "causal"
    samplers: ClassVar[dict[str, Sampler]] = {
        "ar": Sampler(_sample, check=_check, doc="KV cache: one prefill forward, then one token per forward",
                      uses_steps=False),
        "ar_nocache": Sampler(_sample, check=_check, doc="the full causal forward at every step", uses_steps=False),
    }

    def loss_terms(self, params, batch, rng, train):
        return autoregressive.nll_terms(self.logits_fn(params, rng, train), batch["tokens"], batch["loss_mask"],
                                        bos_id=self.bos_id)
