"""EDLM-AR vs MDLM on shakespeare bytes: likelihood (the residual model's Theorem-1 estimate, coAR's ELBO and the
MDLM's NELBO on the same draws), then Gen PPL (an independent AR judge), entropy, NFE and wall time against steps,
and a k x window table of the importance sampler.

  MDLM: configs/shakespeare_mdlm.py; the energy's AR: configs/shakespeare_ar.py (seed 0); the judge: the same AR
  recipe with seed 1 (it never feeds EDLM); EDLM-AR: configs/shakespeare_edlm_ar.py over those two (nothing to train)
Every model trains --train_steps steps (reused when its workdir already holds that checkpoint). Samples: full length,
temperature 1; MDLM = the ancestral sampler, EDLM = `edlm` (ancestral commit, importance-sampled proposal in the
window). Time to quality: MDLM's best Gen PPL over its step counts (and the time of its fastest setting there) vs
the fastest EDLM setting at or below that Gen PPL. Prints tables, then one JSON object as the last stdout line
(also written to --output).

  python benchmarks/edlm.py [--train_steps=300] [--steps_list=16,32,64,128] [--num_samples=32]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import jax
import numpy as np
from common import ensure_trained, evaluate, sample_spec, write_result

from dlm_jax import config as config_lib
from dlm_jax import families
from dlm_jax.eval.genppl import Judge
from dlm_jax.eval.sweep import generation_row
from dlm_jax.experiment import load_workdir_config, restore_for_inference
from dlm_jax.train.loop import train

KEYS = ("sampler", "steps", "nfe", "nfe_energy", "seconds", "tokens_per_second", "entropy_bits", "gen_ppl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--root", default="bench_out", help="where the workdirs live (reused between runs)")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--steps_list", default="16,32,64,128", help="EDLM steps (MDLM: these and 2x the largest)")
    parser.add_argument("--table_steps", type=int, default=64, help="steps of the k x window table")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--windows", default="0.2,0.5,1.0")
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--eval_batches", type=int, default=16)
    parser.add_argument("--output", default="bench_out/edlm.json")
    args = parser.parse_args()
    steps_list = [int(x) for x in args.steps_list.split(",")]
    ks, windows = [int(x) for x in args.ks.split(",")], [float(x) for x in args.windows.split(",")]
    workdir = lambda name: os.path.join(args.root, name)  # noqa: E731
    ensure_trained("configs/shakespeare_mdlm.py", workdir("shk_mdlm"), args.data, args.train_steps)
    ensure_trained("configs/shakespeare_ar.py", workdir("shk_ar"), args.data, args.train_steps)
    ensure_trained("configs/shakespeare_ar.py", workdir("shk_ar_judge"), args.data, args.train_steps,
                   ("--config.seed=1",))
    edlm_dir = workdir("shk_edlm_ar")
    config = config_lib.apply_overrides(families.load_config_file("configs/shakespeare_edlm_ar.py"), [
        f"--config.data.path={args.data}", f"--config.components.mdlm.workdir={workdir('shk_mdlm')}",
        f"--config.components.ar.workdir={workdir('shk_ar')}"])
    train(config, edlm_dir)  # nothing to train: records the components

    likelihood = {k: v for k, v in evaluate(edlm_dir, args.eval_batches, extras=True).items()
                  if k.startswith(("nelbo", "ppl", "log_z"))}  # log_z_ess_mean: the estimate's health
    likelihood["ar_nll"] = evaluate(workdir("shk_ar"), args.eval_batches)["nll"]
    judge = Judge(workdir("shk_ar_judge"))
    exp, params, _ = restore_for_inference(edlm_dir, load_workdir_config(edlm_dir))
    length = exp.config.data.seq_len
    template = np.full((length,), -1, np.int32)
    rows = []

    def run(name: str, sampler: str, steps: int, **options) -> dict:
        spec = sample_spec(exp, sampler, args.num_samples, length, steps=steps, **options)
        _, row = generation_row(exp, params, spec, template, seed=0, batch_size=args.num_samples, judge=judge,
                                retokenize=False)
        rows.append({"model": name, **options, **{k: row[k] for k in KEYS if k in row}})
        print(rows[-1], flush=True)
        return rows[-1]

    for steps in [*steps_list, 2 * max(steps_list)]:
        run("mdlm", "ancestral", steps)
    for steps in steps_list:
        for window in (0.2, 1.0):
            run(f"edlm_ar_k4_w{window}", "edlm", steps, k=4, window=window)
    for k in ks:
        for window in windows:
            if not (k == 4 and window in (0.2, 1.0) and args.table_steps in steps_list):
                run(f"edlm_ar_k{k}_w{window}", "edlm", args.table_steps, k=k, window=window)

    print("\nlikelihood on the val split (nats/byte): nelbo = the residual model's Theorem-1 estimate")
    print("  " + "  ".join(f"{k}={v:.4g}" for k, v in likelihood.items()))
    print(f"\n{'model':<22}{'steps':>6}{'nfe':>6}{'energy':>7}{'gen_ppl':>10}{'entropy':>9}{'seconds':>9}")
    for r in rows:
        print(f"{r['model']:<22}{r['steps']:>6}{r['nfe']:>6.0f}{r.get('nfe_energy', 0):>7.0f}{r['gen_ppl']:>10.3f}"
              f"{r['entropy_bits']:>9.3f}{r['seconds']:>9.2f}")
    table = {(r["model"], r["steps"]): r for r in rows}
    print(f"\nGen PPL at {args.table_steps} steps, k x window (seconds in brackets)")
    print("k \\ w " + "".join(f"{w:>16}" for w in windows))
    for k in ks:
        cells = [table[(f"edlm_ar_k{k}_w{w}", args.table_steps)] for w in windows]
        print(f"{k:<6}" + "".join(f"{c['gen_ppl']:>9.3f} ({c['seconds']:>4.1f})" for c in cells))
    mdlm = {r["steps"]: r for r in rows if r["model"] == "mdlm"}
    targets = {f"edlm_w{w}_beats_mdlm_at_{s}": table[(f"edlm_ar_k4_w{w}", s)]["gen_ppl"] < mdlm[s]["gen_ppl"]
               for s in steps_list for w in (0.2, 1.0)}
    best = min(mdlm.values(), key=lambda r: (r["gen_ppl"], r["seconds"]))  # MDLM's best quality, fastest there
    reached = [r for r in rows if r["model"].startswith("edlm") and r["gen_ppl"] <= best["gen_ppl"]]
    fastest = min(reached, key=lambda r: r["seconds"]) if reached else None
    time_to_quality = {"mdlm_steps": best["steps"], "mdlm_gen_ppl": best["gen_ppl"], "mdlm_seconds": best["seconds"],
                       "edlm": None if fastest is None else {k: fastest[k] for k in ("model", "steps", "gen_ppl",
                                                                                      "seconds")},
                       "speedup": None if fastest is None else best["seconds"] / fastest["seconds"]}
    print("\ntime to MDLM's best Gen PPL:", time_to_quality)
    print("targets:", targets)
    write_result({"benchmark": "edlm", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
                  "cpu_count": os.cpu_count(), "backend": jax.default_backend(), "train_steps": args.train_steps,
                  "num_samples": args.num_samples, "judge": workdir("shk_ar_judge"), "likelihood": likelihood,
                  "rows": rows, "time_to_quality": time_to_quality, "targets": targets}, args.output)


if __name__ == "__main__":
    main()
