"""Generation sweep: samplers x steps -> Gen PPL, entropy, NFE and wall time, as JSON + CSV + a PNG plot."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np

from dlm_jax import fileio
from dlm_jax.eval.entropy import unigram_entropy_bits
from dlm_jax.eval.genppl import Judge
from dlm_jax.eval.speed import BatchCallback, timed_sample
from dlm_jax.sampling.loop import SampleSpec


def generation_row(exp: Any, params: Any, spec: SampleSpec, template: np.ndarray, seed: int, batch_size: int,
                   judge: Judge | None, retokenize: bool,
                   on_batch: BatchCallback | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Samples of one setting and their numbers: the JSON row `dlm-jax sample` prints and the sweep tabulates
    (`steps` is None for a sampler without diffusion steps, e.g. AR); `on_batch` sees each batch as it finishes."""
    tokens, timing = timed_sample(exp, params, spec, template, seed, batch_size, on_batch)
    generated = spec.num_samples * int((template < 0).sum())
    steps = spec.steps if exp.family.sampler(spec.sampler).uses_steps else None
    row = {"sampler": spec.sampler, "steps": steps, "nfe": timing["nfe"], "num_samples": spec.num_samples,
           "length": spec.length, "batch_size": min(batch_size, spec.num_samples), "seconds": timing["seconds"],
           "tokens_per_second": generated / max(timing["seconds"], 1e-9),
           "entropy_bits": unigram_entropy_bits(tokens)}
    row.update({k: v for k, v in timing.items() if k not in ("nfe", "seconds")})  # mean_length, nfe_energy ...
    if judge is not None:
        row.update(judge.gen_ppl(judge.prepare(tokens, exp.tokenizer, retokenize)))
    return tokens, row


def run_sweep(exp: Any, params: Any, specs: list[SampleSpec], template: np.ndarray, seed: int, batch_size: int,
              judge: Judge | None, retokenize: bool, output_dir: str) -> dict[str, Any]:
    """Every setting (sampler x steps); writes gen_sweep.{json,csv,png} to output_dir."""
    rows = []
    for spec in specs:
        _, row = generation_row(exp, params, spec, template, seed, batch_size, judge, retokenize)
        print(json.dumps(row))
        rows.append(row)
    paths = {ext: fileio.join(output_dir, f"gen_sweep.{ext}") for ext in ("json", "csv", "png")}
    fileio.write_text(paths["json"], json.dumps(rows, indent=2))
    table = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))  # samplers may report different stats
    writer = csv.DictWriter(table, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(paths["csv"], table.getvalue())
    _plot(rows, paths["png"], "gen_ppl" if judge is not None else "entropy_bits")
    return {"rows": rows, **{f"{ext}_path": p for ext, p in paths.items()}}


def _plot(rows: list[dict], path: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["seconds"])
        ax.plot([r["seconds"] for r in mine], [r[metric] for r in mine], marker="o", label=sampler)
        for r in mine:
            if r["steps"] is not None:  # AR rows have no diffusion steps
                ax.annotate(f"T={r['steps']}", (r["seconds"], r[metric]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds (sampling, compile excluded)")
    ax.set_ylabel("Gen PPL (judge)" if metric == "gen_ppl" else "unigram entropy (bits)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    fileio.as_path(path).write_bytes(image.getvalue())
    plt.close(fig)
