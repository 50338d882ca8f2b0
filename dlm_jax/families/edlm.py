"""EDLM: a frozen MDLM's denoiser corrected by a sequence energy, p(x_0 | x_t) ~ p_theta(x_0 | x_t) exp(-E)
(Xu et al., ICLR 2025; DESIGN.md section 6). Math: `diffusion/energy.py`; sampler: `sampling/energy.py`.

`edlm.energy`:
  ar    E from a frozen AR component (the product is the AR posterior): nothing to train
  coar  the carry-over AR (masked positions only; self-normalised): nothing to train
  nce   a trained energy net (`models/energy.py`, initialised from the MDLM) on positives x_0 and negatives
        x0_hat ~ p_theta(. | x_t): -log sigmoid(-E+) - log sigmoid(E-)
A workdir of an AR energy records its components and trains nothing (`dlm-jax train` finishes at once).
Eval (docs/edlm.md): the residual model's NELBO estimate w(t) [-log p_theta(x_0 | x_t) + E + log Z(x_t)] with
log Z from n proposals (Theorem 1, leave-one-out upper estimate; coar: log Z = 0 exactly), beside the MDLM's own
NELBO and coAR's ELBO on the same draws.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax.config import choice
from dlm_jax.diffusion import autoregressive
from dlm_jax.diffusion import energy as energy_lib
from dlm_jax.diffusion.masked import forward_mask, masked_token_nll, subs_logits
from dlm_jax.diffusion.schedules import MaskSchedule, sample_times
from dlm_jax.errors import UserError
from dlm_jax.families import registry
from dlm_jax.families.base import Sampler
from dlm_jax.families.mdlm import MaskedFamily
from dlm_jax.models.energy import EnergyNet
from dlm_jax.sampling import energy as energy_sampling
from dlm_jax.sampling import masked as masked_sampling
from dlm_jax.sampling.loop import SampleSpec

Array = jax.Array
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim", "mlp_type", "norm",
                "time_conditioning", "cond_dim")


def _check_edlm(family: EDLM, spec: SampleSpec, template: Any) -> None:
    del template
    energy_sampling.check(spec, family.mdlm.model.cfg.time_conditioning, family.config.data.seq_len)


def _sample_edlm(family: EDLM, params, rng: Array, spec: SampleSpec, template: Any):
    return energy_sampling.sample(family.denoiser(), family.energy_fn(params), rng, family.masked_template(template),
                                  spec, family.mask_id, family.schedule, family.t_eps)


def _check_plain(family: EDLM, spec: SampleSpec, template: Any) -> None:
    del template
    masked_sampling.check_spec(spec, family.mdlm.model.cfg.time_conditioning, family.config.data.seq_len)


def _sample_plain(family: EDLM, params, rng: Array, spec: SampleSpec, template: Any):
    del params
    return masked_sampling.sample(family.denoiser(), rng, family.masked_template(template), spec,
                                  mask_id=family.mask_id, schedule=family.schedule, t_eps=family.t_eps)


def _copy_values(boxed: Any, values: Any) -> Any:
    """`boxed` (fresh params, flax boxes kept) with every leaf's value replaced by the matching leaf of `values`."""
    return jax.tree.map(lambda box, v: box.replace_boxed(v) if isinstance(box, nn.Partitioned) else v, boxed, values,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


@registry.register
class EDLM(MaskedFamily):
    """A frozen MDLM + an energy (frozen AR / carry-over AR, or a trained NCE net); samples by importance sampling."""

    name: ClassVar[str] = "edlm"
    component_families: ClassVar[dict[str, tuple[str, ...]]] = {"mdlm": ("mdlm",), "ar": ("ar",)}
    sampling_components: ClassVar[tuple[str, ...]] = ("mdlm", "ar")
    shape_keys: ClassVar[tuple[str, ...]] = ("energy",)
    samplers: ClassVar[dict[str, Sampler]] = {
        "edlm": Sampler(_sample_edlm, energy_sampling.EDLMOptions, _check_edlm,
                        "parallel importance sampling: k candidates from the MDLM, one kept by softmax(-E / tau) "
                        "while t >= 1 - window; the plain MDLM step after"),
        "ancestral": Sampler(_sample_plain, masked_sampling.AncestralOptions, _check_plain,
                             "the frozen MDLM alone (its ancestral sampler): the baseline EDLM corrects"),
    }

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        s = ml_collections.ConfigDict()
        s.energy = "nce"  # ar | coar (frozen AR component, nothing to train) | nce (a trained energy net)
        s.num_negatives = 1  # nce training: negatives x0_hat ~ p_theta(. | x_t) per positive
        s.num_proposals = 8  # eval: n proposals per row for log Z (Theorem 1, leave-one-out)
        return s

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        c = config.edlm
        choice("edlm.energy", c.energy, energy_lib.ENERGIES)
        if c.num_negatives < 1 or c.num_proposals < 2:
            raise UserError(f"edlm.num_negatives must be >= 1 and edlm.num_proposals >= 2 (the leave-one-out log Z "
                            f"estimate), got {c.num_negatives}, {c.num_proposals}")

    @classmethod
    def needed_components(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """mdlm always; ar for the AR energies, or when given (eval then also reports coAR's ELBO)."""
        if config.edlm.energy in ("ar", "coar") or config.components.ar.workdir:
            return ("mdlm", "ar")
        return ("mdlm",)

    def __init__(self, config, tokenizer, components):
        super().__init__(config, tokenizer, components)
        self.mdlm = components["mdlm"].family
        self.ar = components["ar"].family if "ar" in components else None
        if self.section.energy == "nce":
            ours, theirs = self.model.cfg, self.mdlm.model.cfg
            for field in SHAPE_FIELDS:
                if getattr(ours, field) != getattr(theirs, field):
                    raise UserError(f"the NCE energy net starts from the MDLM's params: model.{field}="
                                    f"{getattr(ours, field)!r} here, {getattr(theirs, field)!r} in "
                                    f"components.mdlm.workdir; use the MDLM's model settings")
        self.model = EnergyNet(self.model.cfg)

    # the masking process is the frozen MDLM's
    @property
    def schedule(self) -> MaskSchedule:
        return self.mdlm.schedule

    @property
    def t_eps(self) -> float:
        return self.mdlm.section.t_eps

    def denoiser(self, rng: Array | None = None) -> masked_sampling.LogitsFn:
        """(x_t [B, L], t [B]) -> raw logits [B, L, V+1] of the frozen MDLM."""
        rng = jax.random.PRNGKey(0) if rng is None else rng
        return self.mdlm.logits_fn(self.frozen["mdlm"], rng, train=False)

    def ar_logprob(self, x0: Array) -> Array:
        """log p_AR(x_0^l | x_0^{<l}) [B, L] from the frozen AR component."""
        logits_fn = self.ar.logits_fn(self.frozen["ar"], jax.random.PRNGKey(0), train=False)
        return autoregressive.token_logprob(logits_fn, x0, self.ar.bos_id)

    def energy_fn(self, params: Any, train: bool = False, rng: Array | None = None) -> energy_sampling.EnergyFn:
        """(x_t, x_0, t, log p_theta(x_0^l | x_t) [M, L]) -> E [M] of the configured energy."""
        if self.section.energy == "nce":
            time = self.model.cfg.time_conditioning
            rngs = {"dropout": rng if rng is not None else jax.random.PRNGKey(0)}
            return lambda x_t, x0, t, token_logp: self.model.apply(
                {"params": params}, x_t, x0, t if time else None, deterministic=not train, rngs=rngs)
        carry_over = self.section.energy == "coar"
        return lambda x_t, x0, t, token_logp: energy_lib.ar_energy(self.ar_logprob(x0), token_logp,
                                                                   x_t == self.mask_id, carry_over)

    def init_params(self, rng: Array) -> Any:
        """nce: the energy net with its backbone copied from the MDLM (every param but the MDLM's head); the AR
        energies have no params."""
        if self.section.energy != "nce":
            return {}
        tokens = jnp.zeros((1, self.config.data.seq_len), jnp.int32)
        params = self.model.init(rng, tokens, tokens, jnp.ones((1,)))["params"]
        mdlm = self.frozen["mdlm"]
        return {k: _copy_values(v, mdlm[k]) if k in mdlm else v for k, v in params.items()}

    def _noised(self, rng: Array, x0: Array) -> tuple[Array, Array, Array, Array]:
        """(t [B], x_t, masked, SUBS logits of the MDLM at x_t): one forward draw at MDLM's antithetic times."""
        rng_t, rng_mask = jax.random.split(rng)
        t = sample_times(rng_t, x0.shape[0], self.t_eps, self.mdlm.section.antithetic)
        x_t, masked = forward_mask(rng_mask, x0, self.schedule.alpha(t), self.mask_id)
        return t, x_t, masked, subs_logits(self.denoiser()(x_t, t), self.mask_id)

    # -- training (nce) -------------------------------------------------------------------------------
    def loss(self, params, batch, rng, train):
        if self.section.energy != "nce":
            raise UserError(f"edlm.energy={self.section.energy!r} has nothing to train (frozen components only)")
        x0 = batch["tokens"]
        k = self.section.num_negatives
        rng_noise, rng_neg, rng_dropout = jax.random.split(rng, 3)
        t, x_t, _, logits = self._noised(rng_noise, x0)
        negatives = energy_sampling.draw_candidates(jax.random.split(rng_neg, k), logits, x_t, self.mask_id)
        energy = self.energy_fn(params, train, rng_dropout)
        e_pos = energy(x_t, x0, t, None)
        e_neg = energy_lib.group_candidates(energy(energy_lib.expand_candidates(x_t, k),
                                                   negatives.reshape(-1, x0.shape[1]),
                                                   energy_lib.expand_candidates(t, k), None), k)
        terms = energy_lib.nce_terms(e_pos, e_neg)
        return terms.pop("loss"), terms

    # -- eval -----------------------------------------------------------------------------------------
    def eval_terms(self, params, batch, rng):
        """Per row [B], nats: the residual NELBO estimate with the upper / lower log Z (`residual`,
        `residual_lower`), the MDLM's NELBO and (with an AR component) coAR's ELBO, all on one draw of (t, x_t)."""
        x0, loss_mask = batch["tokens"], batch["loss_mask"]
        rng_noise, rng_prop = jax.random.split(rng)
        t, x_t, masked, logits = self._noised(rng_noise, x0)
        weight = self.schedule.continuous_weight(t)  # [B]
        token_logp = -masked_token_nll(logits, x0, masked, self.mask_id)  # log p_theta(x_0^l | x_t), 0 if visible
        out = {"mdlm": weight * -(token_logp * loss_mask).sum(-1), "tokens": loss_mask.sum(-1)}
        ar_logp = self.ar_logprob(x0) if self.ar is not None else None
        if ar_logp is not None:
            out["coar"] = weight * -(jnp.where(masked, ar_logp, 0.0) * loss_mask).sum(-1)
        if self.section.energy == "coar":
            out["residual"] = out["residual_lower"] = out["coar"]  # self-normalised: log Z = 0 exactly
            return out
        energy = self.energy_fn(params)
        e0 = (energy_lib.ar_energy(ar_logp, token_logp, masked, carry_over=False) if self.section.energy == "ar"
              else energy(x_t, x0, t, token_logp))
        n, length = self.section.num_proposals, x0.shape[1]
        proposals = energy_sampling.draw_candidates(jax.random.split(rng_prop, n), logits, x_t,
                                                    self.mask_id)  # [B, n, L]
        prop_logp = -masked_token_nll(logits[:, None], proposals, masked[:, None], self.mask_id)
        e_props = energy_lib.group_candidates(energy(
            energy_lib.expand_candidates(x_t, n), proposals.reshape(-1, length), energy_lib.expand_candidates(t, n),
            prop_logp.reshape(-1, length)), n)
        lower, upper = energy_lib.log_partition_estimates(-e_props)
        base = out["mdlm"] + weight * e0
        out.update(residual=base + weight * upper, residual_lower=base + weight * lower, log_z=upper,
                   log_z_ess=energy_lib.effective_sample_size(-e_props))
        return out

    def likelihood_terms(self, params, batch, rng):
        terms = self.eval_terms(params, batch, rng)
        return {"nll_sum": terms["residual"].sum(), "num_tokens": terms["tokens"].sum()}

    def eval_summary(self, per_row: dict[str, Any]) -> dict[str, Any]:
        """Per token: the MDLM's NELBO, coAR's ELBO, the residual estimate with the lower log Z; per row: the mean
        log Z estimate and the mean effective sample size of the n proposals' weights."""
        count = max(float(per_row["tokens"].sum()), 1.0)
        out = {}
        for key in ("mdlm", "coar", "residual_lower"):
            if key in per_row:
                value = float(per_row[key].sum()) / count
                out[f"nelbo_{key}"], out[f"ppl_{key}"] = value, float(np.exp(min(value, 700.0)))
        if "log_z" in per_row:  # the estimate's health: an ESS near 1 of n proposals means log Z is underestimated
            out["log_z_mean"] = float(per_row["log_z"].mean())
            out["log_z_ess_mean"] = float(per_row["log_z_ess"].mean())
        return out
