"""AR -> block diffusion and AR -> MDLM adaptation on shakespeare bytes at equal total training steps
(train.init_from).

  AR:            configs/shakespeare_ar.py, --ar_steps S1 steps
  block scratch: configs/shakespeare_block.py (L' = 4), S1 + S2 steps from a fresh init
  block adapted: configs/shakespeare_block_from_ar.py, S2 steps starting from the AR's params (S1 + S2 in all)
  MDLM scratch:  configs/shakespeare_mdlm.py, S1 + S2 steps
  MDLM adapted:  configs/shakespeare_mdlm_from_ar.py (shifted logits, attention annealed causal -> full over its
                 first anneal_steps), S2 steps from the AR's params
  judge:         configs/shakespeare_ar.py with seed 1, S1 steps (an independent AR that fed no model here)
Reports val ppl / bits per byte (`dlm-jax eval`: block with U[1e-3, 1], AR exact) and Gen PPL of samples (default
sampler of each family, --sample_steps, nucleus --top_p, full length) under the judge, entropy, NFE and wall time.
Workdirs are reused when they already hold the final checkpoint (names carry the step counts); --ar_workdir /
--judge_workdir reuse existing AR runs (e.g. /tmp/shakespeare_ar). --overrides (space-separated --config.* flags)
apply to every model, e.g. tiny sizes for a smoke run. Prints a table, then one JSON object as the last stdout line
(also written to --output).

  python benchmarks/adaptation.py [--ar_steps=1000] [--adapt_steps=300] [--num_samples=32]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import jax
import numpy as np
from common import evaluate, sample_spec, timed_train, write_result

from dlm_jax.eval.genppl import Judge
from dlm_jax.eval.sweep import generation_row
from dlm_jax.experiment import load_workdir_config, restore_for_inference


def _train(recipe: str, workdir: str, args: argparse.Namespace, steps: int, extra: tuple[str, ...] = ()) -> float:
    """Trains unless `workdir` holds step `steps`; wall seconds spent now (0.0 when reused)."""
    return timed_train(recipe, workdir, args.data, steps, (*args.overrides.split(), *extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--root", default="bench_out", help="where the workdirs live (reused between runs)")
    parser.add_argument("--ar_steps", type=int, default=1000, help="S1: the AR's (and the judge's) steps")
    parser.add_argument("--adapt_steps", type=int, default=300, help="S2: fine-tune steps of the adapted block model")
    parser.add_argument("--ar_workdir", default="", help="an existing AR run to adapt (default: train one)")
    parser.add_argument("--judge_workdir", default="", help="an existing independent AR judge (default: train one)")
    parser.add_argument("--overrides", default="", help="--config.* flags for every model, space-separated")
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--sample_steps", type=int, default=128)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--eval_batches", type=int, default=16)
    parser.add_argument("--output", default="bench_out/adaptation.json")
    args = parser.parse_args()
    s1, s2 = args.ar_steps, args.adapt_steps
    workdir = lambda name: os.path.join(args.root, name)  # noqa: E731
    models = {"ar": args.ar_workdir or workdir(f"adapt_ar_{s1}"),
              "block_scratch": workdir(f"adapt_block_scratch_{s1 + s2}"),
              "block_from_ar": workdir(f"adapt_block_from_ar_{s1}_{s2}"),
              "mdlm_scratch": workdir(f"adapt_mdlm_scratch_{s1 + s2}"),
              "mdlm_from_ar": workdir(f"adapt_mdlm_from_ar_{s1}_{s2}")}
    judge_dir = args.judge_workdir or workdir(f"adapt_judge_{s1}")
    seconds = {}
    if not args.ar_workdir:
        seconds["ar"] = _train("configs/shakespeare_ar.py", models["ar"], args, s1)
    if not args.judge_workdir:
        _train("configs/shakespeare_ar.py", judge_dir, args, s1, ("--config.seed=1",))
    seconds["block_scratch"] = _train("configs/shakespeare_block.py", models["block_scratch"], args, s1 + s2)
    seconds["block_from_ar"] = _train("configs/shakespeare_block_from_ar.py", models["block_from_ar"], args, s2,
                                      (f"--config.train.init_from={models['ar']}",))
    seconds["mdlm_from_ar"] = _train("configs/shakespeare_mdlm_from_ar.py", models["mdlm_from_ar"], args, s2,
                                     (f"--config.train.init_from={models['ar']}",
                                      f"--config.mdlm.anneal_steps={max(1, s2 // 3)}"))
    seconds["mdlm_scratch"] = _train("configs/shakespeare_mdlm.py", models["mdlm_scratch"], args, s1 + s2)
    total_steps = {"ar": s1, **{name: s1 + s2 for name in models if name != "ar"}}

    judge = Judge(judge_dir)
    rows = []
    for name, path in models.items():
        result = evaluate(path, args.eval_batches)
        exp, params, step = restore_for_inference(path, load_workdir_config(path))
        length = exp.config.data.seq_len
        spec = sample_spec(exp, exp.family.default_sampler, args.num_samples, length, steps=args.sample_steps,
                           top_p=args.top_p)
        _, gen = generation_row(exp, params, spec, np.full((length,), -1, np.int32), seed=0,
                                batch_size=args.num_samples, judge=judge, retokenize=False)
        rows.append({"model": name, "workdir": path, "total_steps": total_steps[name], "checkpoint_step": step,
                     "train_seconds_now": seconds.get(name, 0.0), "metric": result["metric"],
                     "val": result[result["metric"]], "val_ppl": result["ppl"],
                     "val_bits": result.get("bpc", result["bits_per_token"]),
                     **{k: gen[k] for k in ("sampler", "steps", "nfe", "seconds", "entropy_bits", "gen_ppl")}})
        print(rows[-1], flush=True)

    print(f"\nshakespeare bytes: AR {s1} steps; block L'=4 and MDLM from scratch {s1 + s2} steps; adapted from the "
          f"AR +{s2} steps; samples: {args.num_samples} x {args.sample_steps} steps, top-p {args.top_p}, "
          f"judge {judge_dir}")
    print(f"{'model':<15}{'steps':>7}{'val ppl':>9}{'bits':>7}{'gen_ppl':>9}{'entropy':>9}{'nfe':>6}{'seconds':>9}")
    for r in rows:
        print(f"{r['model']:<15}{r['total_steps']:>7}{r['val_ppl']:>9.3f}{r['val_bits']:>7.3f}{r['gen_ppl']:>9.2f}"
              f"{r['entropy_bits']:>9.3f}{r['nfe']:>6.0f}{r['seconds']:>9.2f}")
    by = {r["model"]: r for r in rows}
    targets = {"adapted_val_ppl_below_scratch": by["block_from_ar"]["val_ppl"] < by["block_scratch"]["val_ppl"],
               "adapted_gen_ppl_below_scratch": by["block_from_ar"]["gen_ppl"] < by["block_scratch"]["gen_ppl"],
               "mdlm_adapted_val_ppl_below_scratch": by["mdlm_from_ar"]["val_ppl"] < by["mdlm_scratch"]["val_ppl"],
               "mdlm_adapted_gen_ppl_below_scratch": by["mdlm_from_ar"]["gen_ppl"] < by["mdlm_scratch"]["gen_ppl"]}
    print("\ntargets:", targets)
    write_result({"benchmark": "adaptation", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
                  "cpu_count": os.cpu_count(), "backend": jax.default_backend(), "ar_steps": s1, "adapt_steps": s2,
                  "overrides": args.overrides, "num_samples": args.num_samples, "sample_steps": args.sample_steps,
                  "top_p": args.top_p, "judge": judge_dir, "rows": rows, "targets": targets}, args.output)


if __name__ == "__main__":
    main()
