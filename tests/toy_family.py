"""A toy family registered only in the tests: it proves the family interface carries what CCDD, EDLM and Cosmos
need without touching the train loop, eval, checkpointing or the CLI:

  - a non-Transformer module (an MLP over a per-token latent plus learned position vectors),
  - one frozen component (`teacher`: a trained AR workdir of this codebase) used inside the jitted loss,
  - a loss that is not an NLL (student cross-entropy + a distillation KL to the teacher's next-token
    distribution), and no token likelihood (eval reports the averaged loss and its metrics),
  - its own config section (`toy.width`, `toy.distill`) with validation and a shape key,
  - a latent sampler (Gaussian prior -> shrink steps -> decode) on the `sample_latent` skeleton, with typed options.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dlm_jax.diffusion.autoregressive import shift_right
from dlm_jax.diffusion.common import token_nll
from dlm_jax.errors import UserError
from dlm_jax.families import Family, Sampler, register
from dlm_jax.sampling.loop import argmax_last, option, sample_latent


class LatentUnigram(nn.Module):
    """latent [B, L, W] -> logits [B, L, V]: position vectors + a two-layer MLP; no attention, no token input."""

    vocab_size: int
    length: int
    width: int

    @nn.compact
    def __call__(self, latent: jax.Array) -> jax.Array:
        positions = self.param("positions", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                         (None, "embed")), (self.length, self.width))
        h = latent[:, : self.length] + positions[: latent.shape[1]]
        h = nn.gelu(nn.Dense(self.width, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")), name="hidden")(h))
        return nn.Dense(self.vocab_size, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "vocab")), name="out")(h)


@dataclasses.dataclass(frozen=True)
class LatentOptions:
    shrink: float = option(0.5, "each step multiplies the latent by this factor")


def _sample_latent(family: Toy, params, rng, spec, template):
    width = family.section.width
    shape = (spec.num_samples, spec.length, width)

    def decode(latent):
        return argmax_last(family.module.apply({"params": params}, latent))

    return sample_latent(lambda r: jax.random.normal(r, shape), lambda z, i, r: z * spec.options.shrink, decode, rng,
                         template, spec.num_samples, spec.steps)


def _check_latent(family: Toy, spec, template) -> None:
    del template
    if not 0.0 <= spec.options.shrink <= 1.0:
        raise UserError(f"--sampler.shrink must be in [0, 1], got {spec.options.shrink}")
    if spec.length > family.config.data.seq_len:
        raise UserError(f"the toy model has {family.config.data.seq_len} positions, not {spec.length}")


@register
class Toy(Family):
    name: ClassVar[str] = "toy"
    metric_name: ClassVar[str | None] = None  # no token likelihood
    component_families: ClassVar[dict[str, tuple[str, ...]]] = {"teacher": ("ar",)}
    shape_keys: ClassVar[tuple[str, ...]] = ("width",)
    samplers: ClassVar[dict[str, Sampler]] = {
        "latent": Sampler(_sample_latent, LatentOptions, _check_latent, "Gaussian prior, shrink steps, argmax decode"),
    }

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({"width": 32, "distill": 0.5})

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        if config.toy.width < 1 or config.toy.distill < 0:
            raise UserError("toy.width must be >= 1 and toy.distill >= 0")

    def __init__(self, config, tokenizer, components):
        super().__init__(config, tokenizer, components)
        self.teacher = components["teacher"].family  # same tokenizer: checked by Family.__init__
        self.module = LatentUnigram(tokenizer.vocab_size, config.data.seq_len, config.toy.width)

    def init_params(self, rng):
        return self.module.init(rng, jnp.zeros((1, self.config.data.seq_len, self.section.width)))["params"]

    def loss(self, params, batch, rng, train):
        del train
        tokens, weights = batch["tokens"], batch["loss_mask"]
        latent = jax.random.normal(rng, tokens.shape + (self.section.width,))
        logits = self.module.apply({"params": params}, latent)
        ce = (token_nll(logits, tokens) * weights).sum() / jnp.maximum(weights.sum(), 1.0)
        teacher_logits = self.teacher.logits_fn(self.frozen["teacher"], rng, train=False)(
            shift_right(tokens, self.teacher.bos_id))
        teacher_probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
        kl = (teacher_probs * (jax.nn.log_softmax(teacher_logits) - jax.nn.log_softmax(logits))).sum(-1)
        distill = (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0)
        return ce + self.section.distill * distill, {"ce": ce, "distill": distill}
