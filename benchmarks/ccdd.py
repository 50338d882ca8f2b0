"""CCDD vs MDLM on shakespeare bytes at equal training steps: likelihood (CCDD's valid bound and the paper's token
term given the latent path, next to MDLM's NELBO), then Gen PPL (an independent AR judge), entropy, NFE and wall time
at 8 / 16 / 64 / 256 steps, the three fusion variants side by side.

  the encoder: the shakespeare AR recipe (seed 0); the judge: the same recipe trained with seed 1 (it never fed CCDD)
  MDLM: configs/shakespeare_mdlm.py; CCDD: configs/shakespeare_ccdd.py with fusion sum / two_stream / joint_attention
Every model trains --train_steps steps (reused when its workdir already holds that checkpoint). Samples: the
default sampler of each family (MDLM ancestral, CCDD `ccdd`: ancestral commit + DDIM latent, unguided), temperature
1, full length. Prints a table, then one JSON object as the last stdout line (also written to --output).

  python benchmarks/ccdd.py [--train_steps=300] [--steps_list=8,16,64,256] [--num_samples=32]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import jax
import numpy as np
from common import ensure_trained, evaluate, sample_spec, write_result

from dlm_jax.eval.genppl import Judge
from dlm_jax.eval.sweep import generation_row
from dlm_jax.experiment import load_workdir_config, restore_for_inference

FUSIONS = ("sum", "two_stream", "joint_attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--root", default="bench_out", help="where the workdirs live (reused between runs)")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--steps_list", default="8,16,64,256")
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--eval_batches", type=int, default=16)
    parser.add_argument("--output", default="bench_out/ccdd.json")
    args = parser.parse_args()
    steps_list = [int(x) for x in args.steps_list.split(",")]
    workdir = lambda name: os.path.join(args.root, name)  # noqa: E731
    ensure_trained("configs/shakespeare_ar.py", workdir("shk_ar"), args.data, args.train_steps)
    ensure_trained("configs/shakespeare_ar.py", workdir("shk_ar_judge"), args.data, args.train_steps,
                   ("--config.seed=1",))
    models = {"mdlm": workdir("shk_mdlm")}
    ensure_trained("configs/shakespeare_mdlm.py", models["mdlm"], args.data, args.train_steps)
    for fusion in FUSIONS:
        models[f"ccdd_{fusion}"] = workdir(f"shk_ccdd_{fusion}")
        ensure_trained("configs/shakespeare_ccdd.py", models[f"ccdd_{fusion}"], args.data, args.train_steps,
                       (f"--config.ccdd.fusion={fusion}", f"--config.components.encoder.workdir={workdir('shk_ar')}"))

    judge = Judge(workdir("shk_ar_judge"))
    likelihood, rows = {}, []
    for name, path in models.items():
        result = evaluate(path, args.eval_batches, extras=name != "mdlm")
        likelihood[name] = {k: result[k] for k in ("nelbo", "ppl", "bpc", "nelbo_tokens_given_latent",
                                                   "ppl_tokens_given_latent", "bound_latent", "bound_recon")
                            if k in result}
        exp, params, _ = restore_for_inference(path, load_workdir_config(path))
        length = exp.config.data.seq_len
        template = np.full((length,), -1, np.int32)
        for steps in steps_list:
            spec = sample_spec(exp, exp.family.default_sampler, args.num_samples, length, steps=steps)
            _, row = generation_row(exp, params, spec, template, seed=0, batch_size=args.num_samples, judge=judge,
                                    retokenize=False)
            rows.append({"model": name, **{k: row[k] for k in ("sampler", "steps", "nfe", "seconds",
                                                               "tokens_per_second", "entropy_bits", "gen_ppl")}})
            print(rows[-1], flush=True)

    print("\nlikelihood on the val split (nats/byte; CCDD nelbo = the valid bound, tokens_given_latent = the paper's)")
    for name, values in likelihood.items():
        print(f"  {name:<22} " + "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
    print(f"\n{'model':<22}{'steps':>6}{'nfe':>6}{'gen_ppl':>10}{'entropy':>9}{'seconds':>9}")
    for r in rows:
        print(f"{r['model']:<22}{r['steps']:>6}{r['nfe']:>6}{r['gen_ppl']:>10.3f}{r['entropy_bits']:>9.3f}"
              f"{r['seconds']:>9.2f}")
    gen = {(r["model"], r["steps"]): r["gen_ppl"] for r in rows}
    targets = {}
    if {8, 16, 64} <= set(steps_list):
        for fusion in FUSIONS:
            targets[f"{fusion}_8_beats_mdlm_8"] = gen[(f"ccdd_{fusion}", 8)] < gen[("mdlm", 8)]
            targets[f"{fusion}_16_no_worse_than_mdlm_64"] = gen[(f"ccdd_{fusion}", 16)] <= gen[("mdlm", 64)]
    print("\ntargets:", targets)
    write_result({"benchmark": "ccdd", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
                  "cpu_count": os.cpu_count(), "backend": jax.default_backend(), "train_steps": args.train_steps,
                  "num_samples": args.num_samples, "judge": workdir("shk_ar_judge"), "likelihood": likelihood,
                  "rows": rows, "targets": targets}, args.output)


if __name__ == "__main__":
    main()
