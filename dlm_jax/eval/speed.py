"""Timed sampling: compile once (outside the clock), then draw every batch and time it (DESIGN.md section 9)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dlm_jax.sampling.loop import SampleSpec
from dlm_jax.train import sharding

# Called after each batch: (batch index, number of batches, the batch's samples [n, L] (the last batch cut to
# num_samples), sampling seconds so far, compile excluded).
BatchCallback = Callable[[int, int, np.ndarray, float], None]


def timed_sample(exp: Any, params: Any, spec: SampleSpec, template: np.ndarray, seed: int, batch_size: int,
                 on_batch: BatchCallback | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """`spec.num_samples` samples in batches of `batch_size` (batch b uses fold_in(PRNGKey(seed), b)); `on_batch`
    sees each batch as it finishes (outside the clock).

    Returns (tokens [N, L], {"nfe": mean NFE per batch, "seconds": sampling wall time, compile excluded, and
    "mean_length" when the sampler ends samples early (its stats carry "lengths"), and the mean of any other scalar
    stat of the sampler (e.g. EDLM's "nfe_energy")}).
    """
    batch = min(batch_size, spec.num_samples)
    batch_spec = dataclasses.replace(spec, num_samples=batch)
    exp.family.check_sample(batch_spec, template)
    num_batches = -(-spec.num_samples // batch)
    base = jax.random.PRNGKey(seed)
    with sharding.mesh_context(exp.mesh):
        sample = jax.jit(lambda p, frozen, rng: exp.family.bind(frozen).sample(p, rng, batch_spec, template))
        compiled = sample.lower(params, exp.frozen, base).compile()
        outputs, nfes, lengths, seconds, extra = [], [], [], 0.0, {}
        for b in range(num_batches):
            rng = jax.random.fold_in(base, b)
            start = time.perf_counter()
            tokens, stats = jax.block_until_ready(compiled(params, exp.frozen, rng))
            seconds += time.perf_counter() - start
            outputs.append(np.asarray(jax.device_get(tokens)))
            if on_batch is not None:
                on_batch(b, num_batches, outputs[-1][: spec.num_samples - b * batch], seconds)
            nfes.append(int(stats["nfe"]))
            if "lengths" in stats:
                lengths.append(np.asarray(jax.device_get(stats["lengths"])))
            for key, value in stats.items():
                if key not in ("nfe", "lengths") and np.ndim(value) == 0:
                    extra.setdefault(key, []).append(float(value))
    timing = {"nfe": float(np.mean(nfes)), "seconds": seconds, **{k: float(np.mean(v)) for k, v in extra.items()}}
    if lengths:
        timing["mean_length"] = float(np.mean(np.concatenate(lengths)[: spec.num_samples]))
    return np.concatenate(outputs)[: spec.num_samples], timing
