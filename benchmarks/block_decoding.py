"""Block diffusion decoding: KV cache vs no cache, block vs MDLM vs AR-with-cache, and the quality ordering.

  1. speed: `block` (exact KV cache) vs `block_nocache` at L = 512, L' = 16 (identical tokens required), and the
     Fast-dLLM approximate caches of a full MDLM (`prefix_cache`, `dual_cache`) vs its exact `semi_ar`
  2. quality at equal training compute: the shakespeare recipes (MDLM, block L' = 4, AR: same backbone, data,
     steps and batch) trained here, val NELBO/NLL (ppl; block with U[1e-3, 1]), then tokens/s and Gen PPL
     (judge: the AR model) at matched length, steps and batch, next to AR decoding with its KV cache
Prints a table, then one JSON object as the last stdout line (also written to --output).

  python benchmarks/block_decoding.py [--train_steps=300] [--skip_quality]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import jax
import numpy as np
from common import ensure_trained, evaluate, random_model, sample_spec, write_result

from dlm_jax.eval.sweep import generation_row
from dlm_jax.experiment import load_workdir_config, restore_for_inference

RECIPES = {"mdlm": "configs/shakespeare_mdlm.py", "block": "configs/shakespeare_block.py",
           "ar": "configs/shakespeare_ar.py"}


def speed_rows(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Random-weight models at L = args.length (speed and token identity do not depend on training)."""
    from dlm_jax.eval.speed import timed_sample

    rows, checks = [], {}
    for family, samplers in (("block", ("block", "block_nocache")),
                             ("mdlm", ("semi_ar", "prefix_cache", "dual_cache"))):
        exp, params = random_model(RECIPES[family], (f"--config.data.seq_len={args.length}",
                                                     f"--config.block.block_size={args.block_size}"))
        template = np.full((args.length,), -1, np.int32)
        outputs = {}
        for sampler in samplers:
            block = args.block_size if family == "block" else args.approx_block
            spec = sample_spec(exp, sampler, args.num_samples, args.length, steps=args.steps, block_length=block)
            tokens, timing = timed_sample(exp, params, spec, template, seed=0, batch_size=args.num_samples)
            outputs[sampler] = tokens
            rows.append({"family": family, "sampler": sampler, "length": args.length, "block": block,
                         "steps": args.steps, "nfe": timing["nfe"], "seconds": timing["seconds"],
                         "tokens_per_second": args.num_samples * args.length / timing["seconds"]})
        if family == "block":
            checks["block_cache_identical_tokens"] = bool((outputs["block"] == outputs["block_nocache"]).all())
    by = {r["sampler"]: r for r in rows}
    checks["block_cache_speedup"] = by["block_nocache"]["seconds"] / by["block"]["seconds"]
    checks["prefix_cache_speedup_vs_semi_ar"] = by["semi_ar"]["seconds"] / by["prefix_cache"]["seconds"]
    checks["dual_cache_speedup_vs_semi_ar"] = by["semi_ar"]["seconds"] / by["dual_cache"]["seconds"]
    return rows, checks


def quality_rows(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Train (if needed) MDLM, block L' = 4 and AR at the same budget; val likelihood, then generation."""
    workdirs = {f: os.path.join(args.workdir_root, f"shk_{f}") for f in RECIPES}
    for family, workdir in workdirs.items():
        ensure_trained(RECIPES[family], workdir, args.data, args.train_steps)
    likelihood = {f: evaluate(w, args.eval_batches) for f, w in workdirs.items()}
    from dlm_jax.eval.genppl import Judge

    judge = Judge(workdirs["ar"])
    rows = []
    settings = (("ar", "ar"), ("block", "block"), ("mdlm", "ancestral"), ("mdlm", "cached"), ("mdlm", "semi_ar"),
                ("mdlm", "dual_cache"))
    for family, sampler in settings:
        exp, params, _ = restore_for_inference(workdirs[family], load_workdir_config(workdirs[family]))
        spec = sample_spec(exp, sampler, args.num_samples, args.quality_length, steps=args.quality_steps,
                           top_p=args.top_p, block_length=4)
        template = np.full((args.quality_length,), -1, np.int32)
        _, row = generation_row(exp, params, spec, template, 0, args.num_samples, judge, False)
        rows.append({"family": family, **row})
    ar_seconds = rows[0]["seconds"]
    for r in rows:
        r["seconds_over_ar_cache"] = r["seconds"] / ar_seconds
    ppl = {f: likelihood[f]["ppl"] for f in RECIPES}
    return rows, {"val_ppl": ppl, "ordering_ar_lt_block_lt_mdlm": ppl["ar"] < ppl["block"] < ppl["mdlm"],
                  "train_steps": args.train_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--block_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=512, help="speed part: diffusion steps (T / blocks per block)")
    parser.add_argument("--approx_block", type=int, default=64, help="prefix/dual cache block (unrolled per block)")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--workdir_root", default="bench_out")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--eval_batches", type=int, default=16)
    parser.add_argument("--quality_length", type=int, default=128)
    parser.add_argument("--quality_steps", type=int, default=128)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--skip_quality", action="store_true")
    parser.add_argument("--output", default="bench_out/block_decoding.json")
    args = parser.parse_args()

    speed, speed_checks = speed_rows(args)
    print(f"backend {jax.default_backend()} x{jax.device_count()}, {platform.processor() or platform.machine()}")
    print(f"speed: random weights, L={args.length}, L'={args.block_size}, T={args.steps}, batch {args.num_samples}")
    print(f"{'family':7s} {'sampler':14s} {'NFE':>6s} {'seconds':>8s} {'tokens/s':>9s}")
    for r in speed:
        print(f"{r['family']:7s} {r['sampler']:14s} {r['nfe']:6.0f} {r['seconds']:8.2f} {r['tokens_per_second']:9.0f}")
    met = speed_checks["block_cache_speedup"] >= 4 and speed_checks["block_cache_identical_tokens"]
    print(f"target: block KV cache >= 4x faster than no cache with identical tokens: measured "
          f"{speed_checks['block_cache_speedup']:.2f}x, identical={speed_checks['block_cache_identical_tokens']} "
          f"({'met' if met else 'NOT met'})")
    result = {"benchmark": "block_decoding", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
              "jax": jax.__version__, "backend": jax.default_backend(), "settings": vars(args),
              "speed_rows": speed, "speed_checks": speed_checks}
    if not args.skip_quality:
        quality, quality_checks = quality_rows(args)
        print(f"\nquality: shakespeare recipes, {args.train_steps} steps each; generation L={args.quality_length}, "
              f"T={args.quality_steps}, top-p {args.top_p}, judge = the AR model")
        print("val ppl: " + ", ".join(f"{f} {p:.3f}" for f, p in quality_checks["val_ppl"].items()))
        print(f"{'family':7s} {'sampler':12s} {'NFE':>6s} {'seconds':>8s} {'tokens/s':>9s} {'GenPPL':>8s} "
              f"{'entropy':>8s} {'/AR':>6s}")
        for r in quality:
            print(f"{r['family']:7s} {r['sampler']:12s} {r['nfe']:6.0f} {r['seconds']:8.2f} "
                  f"{r['tokens_per_second']:9.0f} {r['gen_ppl']:8.2f} {r['entropy_bits']:8.2f} "
                  f"{r['seconds_over_ar_cache']:6.2f}")
        print(f"target: val ppl AR < block(L'=4) < MDLM: "
              f"{'met' if quality_checks['ordering_ar_lt_block_lt_mdlm'] else 'NOT met'}")
        result.update({"quality_rows": quality, "quality_checks": quality_checks})
    write_result(result, args.output)


if __name__ == "__main__":
    main()
