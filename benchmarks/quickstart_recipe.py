"""Which recipe should the quickstart train (issue 15)? The README's main job (configs/quickstart.py: an MDLM on the
embedded python_stdlib corpus) against the AR -> MDLM adaptation on the same corpus and backbone in the same number
of steps (so about the same wall time, measured here):

  scratch:   configs/quickstart.py, --steps steps
  adapted:   configs/quickstart.py as an `ar` for --ar_steps steps, then configs/quickstart.py with
             train.init_from=that AR, mdlm.shift_logits (the AR's output alignment kept) and the attention annealed
             causal -> full over the first third of the remaining steps (the Dream / DiffuLLaMA recipe)
  judge:     configs/quickstart.py as an `ar` with seed 1, --steps steps (fed no model here)
Reports train seconds, val bits per byte, Gen PPL and unigram entropy of --num_samples samples of each from the
command the README runs (`dlm-jax sample`: the family's default sampler and the config's sample.steps), and prints
two samples of each. The last stdout line is one JSON object (also written to --output).

  python benchmarks/quickstart_recipe.py [--steps 600] [--ar_steps 450] [--num_samples 32]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import numpy as np
from common import evaluate, sample_spec, timed_train, write_result

from dlm_jax.eval.genppl import Judge
from dlm_jax.eval.sweep import generation_row
from dlm_jax.experiment import load_workdir_config, restore_for_inference

RECIPE = "configs/quickstart.py"


def train_arm(workdir: str, steps: int, overrides: tuple[str, ...]) -> float:
    """Wall seconds of training `workdir` now; no data path: the quickstart's corpus is embedded (python_stdlib)."""
    return timed_train(RECIPE, workdir, "", steps, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="bench_out", help="where the workdirs live (reused between runs)")
    parser.add_argument("--steps", type=int, default=600, help="total steps of each recipe (the quickstart's)")
    parser.add_argument("--ar_steps", type=int, default=450, help="of which the AR's (the rest adapt it)")
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--overrides", default="", help="--config.* flags for every model, space-separated")
    parser.add_argument("--output", default="bench_out/quickstart_recipe.json")
    args = parser.parse_args()
    steps, ar_steps = args.steps, args.ar_steps
    if not 0 < ar_steps < steps:
        parser.error(f"--ar_steps must be in (0, --steps={steps})")
    common = tuple(args.overrides.split())
    dirs = {name: os.path.join(args.root, f"quickstart_{name}_{steps}") for name in ("scratch", "judge")}
    dirs["ar"] = os.path.join(args.root, f"quickstart_ar_{ar_steps}")
    dirs["adapted"] = os.path.join(args.root, f"quickstart_adapted_{ar_steps}_{steps - ar_steps}")
    as_ar = ("--config.model.family=ar", *common)
    seconds = {"scratch": train_arm(dirs["scratch"], steps, common),
               "ar": train_arm(dirs["ar"], ar_steps, as_ar)}
    seconds["adapted"] = train_arm(dirs["adapted"], steps - ar_steps, (
        f"--config.train.init_from={dirs['ar']}", "--config.mdlm.shift_logits=True",
        f"--config.mdlm.anneal_steps={max(1, (steps - ar_steps) // 3)}", "--config.train.warmup_steps=20",
        "--config.train.learning_rate=1e-3", *common))
    train_arm(dirs["judge"], steps, ("--config.seed=1", *as_ar))

    judge = Judge(dirs["judge"])
    rows = []
    for name in ("scratch", "adapted"):
        exp, params, _ = restore_for_inference(dirs[name], load_workdir_config(dirs[name]))
        config = exp.config
        length = config.data.seq_len
        spec = sample_spec(exp, exp.family.default_sampler, args.num_samples, length, steps=config.sample.steps)
        tokens, gen = generation_row(exp, params, spec, np.full((length,), -1, np.int32), seed=0,
                                     batch_size=args.num_samples, judge=judge, retokenize=False)
        result = evaluate(dirs[name], 8)
        train_seconds = seconds[name] + (seconds["ar"] if name == "adapted" else 0.0)
        rows.append({"recipe": name, "workdir": dirs[name], "total_steps": steps, "train_seconds_now": train_seconds,
                     "val_bits": result.get("bpc", result["bits_per_token"]), "sampler": spec.sampler,
                     "sample_steps": spec.steps, "gen_ppl": gen["gen_ppl"], "entropy_bits": gen["entropy_bits"],
                     "samples": [exp.tokenizer.decode(list(map(int, t))) for t in tokens[:2]]})
    for r in rows:
        print(f"\n== {r['recipe']}: {r['total_steps']} steps, {r['train_seconds_now']:.0f} s trained now, "
              f"{r['val_bits']:.3f} bits/byte, Gen PPL {r['gen_ppl']:.2f}, entropy {r['entropy_bits']:.2f} bits")
        for text in r["samples"]:
            print(repr(text))
    write_result({"benchmark": "quickstart_recipe", "date": datetime.date.today().isoformat(),
                  "machine": platform.processor() or platform.machine(), "steps": steps, "ar_steps": ar_steps,
                  "num_samples": args.num_samples, "judge": dirs["judge"], "rows": rows}, args.output)


if __name__ == "__main__":
    main()
