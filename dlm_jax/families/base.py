"""What a family is: the interface the train loop, checkpointing, eval and the CLI talk to (DESIGN.md section 1).

A family owns building its module(s) and params, the frozen components it loads from other workdirs, its loss
`(params, batch, rng, train) -> (scalar, metrics)`, optional likelihood terms (summed nll + token count: what eval
reports as nelbo / nll, ppl and bits), its config section (defaults, validation, shape keys) and its samplers
(name -> function + typed options). Its math lives in `diffusion/` and `sampling/`.

`TransformerFamily` is the shared base of the token families built on the one backbone (mdlm, block, ar).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax.data.tokenizers import Tokenizer
from dlm_jax.errors import UserError
from dlm_jax.models.transformer import Transformer, TransformerConfig, init_cache
from dlm_jax.sampling.loop import NoOptions, SampleSpec

Array = jax.Array
Params = Any
Metrics = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One entry of a family's sampler table."""

    fn: Callable[..., tuple[Array, dict[str, Array]]]  # (family, params, rng, spec, template) -> (tokens, stats)
    options: type = NoOptions  # frozen dataclass of the sampler's options (`--sampler.key=value`)
    check: Callable[..., None] | None = None  # (family, spec, template) -> None or a one-line UserError
    doc: str = ""
    # (option, accepted families): options naming another workdir whose model the sampler runs (DiffuSpec's AR
    # verifier); experiment.load_sampler_components adds it as the family's component of that name
    components: tuple[tuple[str, tuple[str, ...]], ...] = ()
    uses_steps: bool = True  # whether `--steps` is its budget of diffusion steps (False: AR, one token per forward)


@dataclasses.dataclass(frozen=True)
class Component:
    """A frozen trained model of another workdir (experiment.load_component): never trained, never checkpointed."""

    name: str  # the config key components.<name>.workdir
    workdir: str
    family: Family  # built from the component's own config.json
    params: Params  # its eval params (EMA when kept)
    config: ml_collections.ConfigDict


class Family:
    """Base class of every family. Subclasses set the class attributes and implement init_params and loss."""

    name: ClassVar[str]
    # What likelihood eval reports: "nelbo" (an upper bound on the NLL), "nll" (exact), or None when the family has
    # no token likelihood (eval then reports the averaged loss and metrics).
    metric_name: ClassVar[str | None] = "nelbo"
    # Frozen components: name -> the families a component of that name may be (config components.<name>.workdir).
    component_families: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Components the samplers run (EDLM's energy AR): a Gen PPL judge may not be one of them (it would grade itself).
    sampling_components: ClassVar[tuple[str, ...]] = ()
    samplers: ClassVar[dict[str, Sampler]] = {}  # the first is the default; none: the family does not generate
    no_sampler_hint: ClassVar[str] = ""  # what to do instead, for the error of a family without samplers
    shape_keys: ClassVar[tuple[str, ...]] = ()  # keys of the family's section that fix the params' shapes
    reading_keys: ClassVar[tuple[str, ...]] = ()  # keys that change how the params are read, not their shapes
    imported_layouts: ClassVar[bool] = False  # whether model.positions / use_bias / norm_eps (GPT-2 ...) apply

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict | None:
        """Defaults of `config.<name>` (None: the family has no section)."""
        return None

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        """One-line UserErrors for values of the family's section (and common keys it cannot work with)."""
        del config

    @classmethod
    def needed_components(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The component slots this config loads (default: every slot of `component_families`)."""
        del config
        return tuple(cls.component_families)

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, components: dict[str, Component]):
        self.config = config
        self.tokenizer = tokenizer
        self.components = components
        self.frozen: dict[str, Params] = {name: c.params for name, c in components.items()}
        for name, component in components.items():
            self._check_tokenizer(component, f"components.{name}.workdir")

    def _check_tokenizer(self, component: Component, key: str) -> None:
        """A component reads and writes this model's token ids: a one-line error naming `key` otherwise."""
        theirs, ours = component.family.tokenizer.describe(), self.tokenizer.describe()
        if theirs != ours:
            raise UserError(f"{key}={component.workdir!r} uses another tokenizer ({theirs}, this config: {ours})")

    def add_component(self, component: Component, key: str) -> None:
        """Adopts a component loaded after construction (a sampler's verifier, named by the setting `key`): its
        params join `frozen`, the jit arguments."""
        self._check_tokenizer(component, key)
        self.components = {**self.components, component.name: component}
        self.frozen = {**self.frozen, component.name: component.params}

    def bind(self, frozen: dict[str, Params]) -> Family:
        """This family reading `frozen` as its components' params (jit arguments, not baked-in constants)."""
        bound = copy.copy(self)
        bound.frozen = frozen
        return bound

    @property
    def section(self) -> ml_collections.ConfigDict:
        return self.config[self.name]

    # -- training ----------------------------------------------------------------------------------
    def init_params(self, rng: Array) -> Params:
        """Fresh trainable params (flax boxes with logical axis names are kept: they give the shardings)."""
        raise NotImplementedError

    def loss(self, params: Params, batch: dict[str, Array], rng: Array, train: bool) -> tuple[Array, Metrics]:
        """The training objective (scalar) and metrics to log. batch: "tokens", "loss_mask" [B, L]; in training
        also "step" (the optimizer step, a scalar int32) for schedules inside the loss."""
        raise NotImplementedError

    def likelihood_terms(self, params: Params, batch: dict[str, Array], rng: Array) -> Metrics:
        """{"nll_sum", "num_tokens"} over the batch (pooled across batches by eval); only when metric_name is set."""
        raise NotImplementedError(f"the {self.name} family has no token likelihood")

    # optional eval extras: per-row arrays from one val batch (eval_terms), then their summary (eval_summary)
    eval_terms: ClassVar[Callable[..., Metrics] | None] = None  # (self, params, batch, rng) -> arrays [B, ...]
    eval_summary: ClassVar[Callable[..., dict[str, Any]] | None] = None  # (self, {key: [N, ...]}) -> results

    # optional data statistics fit outside the gradient, saved in WORKDIR/statistics.npz and adopted through
    # use_statistics wherever the workdir is restored (Cosmos: the frozen encoder's per-channel mean / std before the
    # first step, the latents' per-(slot, channel) mean / std after the last)
    statistics_before_training: ClassVar[Callable[..., dict[str, np.ndarray]] | None] = None  # (self, train batches)
    statistics_after_training: ClassVar[Callable[..., dict[str, np.ndarray]] | None] = None  # (self, params, val)

    def use_statistics(self, stats: dict[str, np.ndarray], where: str) -> None:
        """Adopts saved statistics before anything is traced (`where`: the workdir, for errors)."""
        del stats, where

    # -- sampling ----------------------------------------------------------------------------------
    @property
    def default_sampler(self) -> str:
        self._check_generates()
        return next(iter(self.samplers))

    def _check_generates(self) -> None:
        if not self.samplers:
            raise UserError(f"a {self.name} model does not generate text (it has no sampler){self.no_sampler_hint}")

    def sampler(self, name: str) -> Sampler:
        self._check_generates()
        if name not in self.samplers:
            raise UserError(f"unknown sampler {name!r} for a {self.name} model; choose one of "
                            f"{', '.join(self.samplers)}")
        return self.samplers[name]

    def check_sample(self, spec: SampleSpec, template: Any) -> None:
        """One-line UserErrors for a sampling call this family cannot run (before anything is compiled)."""
        entry = self.sampler(spec.sampler)
        if spec.options is not None and not isinstance(spec.options, entry.options):
            raise TypeError(f"{spec.sampler} takes {entry.options.__name__}, got {type(spec.options).__name__}")
        if entry.check is not None:
            entry.check(self, self.with_options(spec), template)

    def with_options(self, spec: SampleSpec) -> SampleSpec:
        """The spec with the sampler's default options filled in."""
        if spec.options is not None:
            return spec
        return dataclasses.replace(spec, options=self.sampler(spec.sampler).options())

    def sample(self, params: Params, rng: Array, spec: SampleSpec, template: Any) -> tuple[Array, dict[str, Array]]:
        """(tokens [N, L] int32, {"nfe"}) from a template [L] (-1 where tokens are generated)."""
        return self.sampler(spec.sampler).fn(self, params, rng, self.with_options(spec), template)


class LanguageModel(Transformer):
    """The backbone of the token families."""


class TransformerFamily(Family):
    """A family whose model is the one token backbone (`models/transformer.py`) with an attention mask."""

    mask_mode: ClassVar[str] = "full"  # attention mask of the backbone in training
    imported_layouts: ClassVar[bool] = True
    num_extra_tokens: ClassVar[int] = 0  # ids appended after the tokenizer's vocabulary ([MASK])

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, components: dict[str, Component]):
        super().__init__(config, tokenizer, components)
        cfg = TransformerConfig.from_config(config.model, tokenizer.vocab_size + self.num_extra_tokens,
                                            self.mask_mode, self.block_size())
        self.model = LanguageModel(cfg)

    def block_size(self) -> int:
        """L' of the backbone's block masks (block diffusion); 1 otherwise."""
        return 1

    @property
    def mask_id(self) -> int:
        """[MASK]: the last id (families with num_extra_tokens = 1)."""
        return self.model.cfg.vocab_size - 1

    @property
    def bos_id(self) -> int:
        """The start token of AR decoding: the tokenizer's EOS id (one id both ends a text and starts the next)."""
        return self.tokenizer.eos_id

    def init_params(self, rng: Array) -> Params:
        tokens = jnp.zeros((1, self.config.data.seq_len), jnp.int32)
        return self.model.init(rng, tokens, jnp.ones((1,)))["params"]

    def logits_fn(self, params: Params, rng: Array, train: bool) -> Callable[..., Array]:
        """(tokens [B, L], t [B] | None, **backbone kwargs) -> logits [B, L, V]."""

        def logits(tokens: Array, t: Array | None = None, **kwargs) -> Array:
            return self.model.apply({"params": params}, tokens, t, deterministic=not train, rngs={"dropout": rng},
                                    **kwargs)

        return logits

    def decode_fn(self, params: Params) -> Callable[..., tuple[Array, Any]]:
        """(tokens, t, cache, index, valid=None) -> (logits, cache): the backbone on a block against a KV cache."""

        def decode(tokens, t, cache, index, valid=None):
            return self.model.apply({"params": params}, tokens, t, cache=cache, cache_index=index, cache_len=valid)

        return decode

    def empty_cache(self, batch: int, length: int) -> Any:
        return init_cache(self.model.cfg, batch, length)

    def check_sample(self, spec: SampleSpec, template: Any) -> None:
        super().check_sample(spec, template)
        cfg = self.model.cfg
        if cfg.positions == "learned" and spec.length > cfg.max_positions:
            raise UserError(f"this model has learned positions for {cfg.max_positions} tokens (model.max_positions); "
                            f"cannot sample {spec.length}: lower --length")

    def loss_terms(self, params: Params, batch: dict[str, Array], rng: Array, train: bool) -> Metrics:
        """{"nll_sum", "num_tokens", ...metrics}: the summed token loss (nats), so batches pool exactly."""
        raise NotImplementedError

    def loss(self, params: Params, batch: dict[str, Array], rng: Array, train: bool) -> tuple[Array, Metrics]:
        terms = self.loss_terms(params, batch, rng, train)
        loss = terms["nll_sum"] / jnp.maximum(terms["num_tokens"], 1.0)
        return loss, {k: v for k, v in terms.items() if k not in ("nll_sum", "num_tokens")}

    def likelihood_terms(self, params: Params, batch: dict[str, Array], rng: Array) -> Metrics:
        terms = self.loss_terms(params, batch, rng, train=False)
        return {"nll_sum": terms["nll_sum"], "num_tokens": terms["num_tokens"]}
