"""Likelihood on the val split: NELBO (diffusion families; an upper bound on the NLL) or NLL (AR), in nats/token.

ppl = exp(nelbo), bits_per_token = nelbo / ln 2, and for byte/char tokenizers bpc = bits_per_token. Sums are
pooled over all val tokens before dividing (not a mean of batch means). A family without a token likelihood
(metric_name None) reports its loss and metrics instead, averaged over the val batches.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from dlm_jax.data import pipeline
from dlm_jax.errors import UserError
from dlm_jax.experiment import Experiment
from dlm_jax.train import sharding


def summarize(nll_sum: float, num_tokens: float, character_level: bool, metric: str = "nelbo") -> dict[str, float]:
    """Per-token NELBO or NLL (nats, under the key `metric`), ppl and bits from pooled sums."""
    value = nll_sum / num_tokens
    out = {metric: value, "ppl": math.exp(min(value, 700.0)), "bits_per_token": value / math.log(2),
           "num_tokens": num_tokens}
    if character_level:
        out["bpc"] = out["bits_per_token"]
    return out


class Evaluator:
    """Jitted likelihood over the val split; the val dataset is built once and re-read each call."""

    def __init__(self, exp: Experiment, batch_sharding):
        config = exp.config
        self.exp = exp
        self.batch_sharding = batch_sharding
        self.dataset = pipeline.make_dataset(
            config.data, exp.tokenizer, "validation", config.eval.batch_size // jax.process_count(),
            seed=config.seed, shuffle=False, repeat=False, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        self.metric = exp.family.metric_name

        def eval_step(params: Any, batch: dict[str, jax.Array], rng: jax.Array, frozen: Any) -> dict[str, jax.Array]:
            family = exp.family.bind(frozen)
            if self.metric is not None:
                return family.likelihood_terms(params, batch, rng)
            loss, metrics = family.loss(params, batch, rng, train=False)
            return {"loss": loss, **metrics}

        def extras_step(params: Any, batch: dict[str, jax.Array], rng: jax.Array, frozen: Any) -> dict[str, jax.Array]:
            return {**exp.family.bind(frozen).eval_terms(params, batch, rng),
                    "row_tokens": batch["loss_mask"].sum(axis=1)}

        shardings = dict(in_shardings=(exp.state_shardings.params, batch_sharding, sharding.replicated(exp.mesh),
                                       exp.frozen_shardings()),
                         out_shardings=sharding.replicated(exp.mesh))
        self._step = jax.jit(eval_step, **shardings)
        self._extras = jax.jit(extras_step, **shardings) if exp.family.eval_terms is not None else None

    def run(self, params: Any, step: int, num_batches: int, extras: bool = False) -> dict[str, Any]:
        """The val metric over `num_batches` val batches (-1: the whole split once), same rng stream on every call.

        extras: also the family's extra eval (block diffusion: the variance search over clipped schedules).
        """
        base_rng = jax.random.PRNGKey(self.exp.config.seed + 1)
        sums: dict[str, float] = {}
        batches = 0
        per_row: dict[str, list[np.ndarray]] = {}
        for i, batch in enumerate(self.dataset):
            if 0 <= num_batches <= i:
                break
            batch = sharding.global_batch(batch, self.batch_sharding)
            rng = jax.random.fold_in(base_rng, i)
            terms = jax.device_get(self._step(params, batch, rng, self.exp.frozen))
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(np.float64(value))
            batches += 1
            if extras and self._extras is not None:
                more = jax.device_get(self._extras(params, batch, rng, self.exp.frozen))
                real = more.pop("row_tokens") > 0  # rows that pad the last batch do not count
                for key, values in more.items():
                    per_row.setdefault(key, []).append(np.asarray(values)[real])
        if self.metric is None:
            if not batches:
                raise UserError("the val split gave no batches; check data.val_split / data.val_fraction")
            results = {key: value / batches for key, value in sums.items()}
        else:
            if not sums.get("num_tokens"):
                raise UserError("the val split gave no tokens; check data.val_split / data.val_fraction")
            results = summarize(sums["nll_sum"], sums["num_tokens"], self.exp.tokenizer.is_character_level,
                                self.metric)
        if per_row:
            results.update(self.exp.family.eval_summary({k: np.concatenate(v) for k, v in per_row.items()}))
        return {"step": int(step), "metric": self.metric or "loss", **results}
