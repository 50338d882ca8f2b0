"""Cosmos on shakespeare bytes (L = 128): (1) the autoencoder's reconstruction accuracy, clean and with noised
latents, at compression 1 / 2 / 4 / 8 / 16 with and without augmentation, equal training steps; (2) latent diffusion
vs MDLM: Gen PPL (an independent AR judge), entropy, NFE and wall time per sample against steps, and the time to
MDLM's best Gen PPL (its fastest setting there vs the fastest cosmos setting at or below it).

  autoencoders: configs/shakespeare_cosmos_ae.py (+ compression, augmentation off = token_mask 0, mix_d 1,
  latent_dropout 0); latent diffusion: configs/shakespeare_cosmos.py on the compression-4 augmented autoencoder;
  MDLM: configs/shakespeare_mdlm.py; the judge: configs/shakespeare_ar.py with seed 1 (as benchmarks/edlm.py).
Every model trains its steps once (reused when its workdir already holds that checkpoint); training seconds are
measured for the models trained in this run and read from metrics.jsonl (tokens/s) for reused ones. Samples: full
length, temperature 1 (cosmos: argmax decode of the final x0_hat, as the paper). Prints tables, then one JSON
object as the last stdout line (also written to --output).

  python benchmarks/cosmos.py [--ae_steps=600] [--diffusion_steps=300] [--compressions=1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import numpy as np
from common import ensure_trained, evaluate, sample_spec, write_result

from dlm_jax.eval.genppl import Judge
from dlm_jax.eval.sweep import generation_row
from dlm_jax.experiment import load_workdir_config, restore_for_inference

NO_AUGMENTATION = ("--config.cosmos_ae.token_mask=0", "--config.cosmos_ae.mix_d=1.0",
                   "--config.cosmos_ae.latent_dropout=0")
KEYS = ("sampler", "steps", "nfe", "seconds", "tokens_per_second", "entropy_bits", "gen_ppl")


def train_seconds(workdir: str, recipe: str, data: str, steps: int, overrides: tuple[str, ...] = ()) -> float:
    """Trains (unless done) and returns the training wall time: measured now, or from the workdir's logged tok/s."""
    start = time.perf_counter()
    if ensure_trained(recipe, workdir, data, steps, overrides):
        return time.perf_counter() - start
    config = load_workdir_config(workdir)
    rates = [json.loads(line).get("tokens_per_second") for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rate = float(np.mean([r for r in rates if r]))
    return steps * config.train.batch_size * config.data.seq_len / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--root", default="bench_out", help="where the workdirs live (reused between runs)")
    parser.add_argument("--ae_steps", type=int, default=600)
    parser.add_argument("--diffusion_steps", type=int, default=300)
    parser.add_argument("--mdlm_steps", type=int, default=300)
    parser.add_argument("--compressions", default="1,2,4,8,16")
    parser.add_argument("--cosmos_steps_list", default="25,50,100,200")
    parser.add_argument("--mdlm_steps_list", default="16,32,64,128,256")
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--eval_batches", type=int, default=16)
    parser.add_argument("--output", default="bench_out/cosmos.json")
    args = parser.parse_args()
    workdir = lambda name: os.path.join(args.root, name)  # noqa: E731

    # (1) reconstruction
    recon, seconds = [], {}
    for compression in [int(x) for x in args.compressions.split(",")]:
        for augmented in (True, False):
            name = f"shk_cosmos_ae_c{compression}_{'aug' if augmented else 'noaug'}"
            seconds[name] = train_seconds(workdir(name), "configs/shakespeare_cosmos_ae.py", args.data, args.ae_steps,
                                          (f"--config.cosmos_ae.compression={compression}",
                                           *(() if augmented else NO_AUGMENTATION)))
            result = evaluate(workdir(name), args.eval_batches, extras=True)
            recon.append({"compression": compression, "augmented": augmented, "train_seconds": seconds[name],
                          **{k: v for k, v in result.items() if "accuracy" in k}})
            print(recon[-1], flush=True)

    # (2) latent diffusion vs MDLM
    ae = workdir("shk_cosmos_ae_c4_aug")
    if "shk_cosmos_ae_c4_aug" not in seconds:  # --compressions without 4
        seconds["shk_cosmos_ae_c4_aug"] = train_seconds(ae, "configs/shakespeare_cosmos_ae.py", args.data,
                                                        args.ae_steps, ("--config.cosmos_ae.compression=4",))
    seconds["shk_cosmos"] = train_seconds(workdir("shk_cosmos"), "configs/shakespeare_cosmos.py", args.data,
                                          args.diffusion_steps, (f"--config.components.autoencoder.workdir={ae}",))
    seconds["shk_mdlm"] = train_seconds(workdir("shk_mdlm"), "configs/shakespeare_mdlm.py", args.data, args.mdlm_steps)
    ensure_trained("configs/shakespeare_ar.py", workdir("shk_ar_judge"), args.data, args.mdlm_steps,
                   ("--config.seed=1",))
    judge = Judge(workdir("shk_ar_judge"))
    rows = []
    for model, sampler, steps_list in (("cosmos", "cosmos", args.cosmos_steps_list),
                                       ("mdlm", "ancestral", args.mdlm_steps_list)):
        path = workdir(f"shk_{model}")
        exp, params, _ = restore_for_inference(path, load_workdir_config(path))
        length = exp.config.data.seq_len
        template = np.full((length,), -1, np.int32)
        for steps in [int(x) for x in steps_list.split(",")]:
            spec = sample_spec(exp, sampler, args.num_samples, length, steps=steps)
            _, row = generation_row(exp, params, spec, template, seed=0, batch_size=args.num_samples, judge=judge,
                                    retokenize=False)
            rows.append({"model": model, **{k: row[k] for k in KEYS}})
            print(rows[-1], flush=True)

    print(f"\nreconstruction on shakespeare val (L = 128 bytes, {args.ae_steps} training steps each)")
    noise_keys = sorted({k for r in recon for k in r if k.startswith("token_accuracy_noised")}, reverse=True)
    print(f"{'compression':>11}{'aug':>5}{'token acc':>11}{'seq acc':>9}"
          + "".join(f"{k[15:]:>18}" for k in noise_keys))
    for r in recon:
        print(f"{r['compression']:>11}{'yes' if r['augmented'] else 'no':>5}{r['token_accuracy']:>11.4f}"
              f"{r['sequence_accuracy']:>9.3f}" + "".join(f"{r[k]:>18.4f}" for k in noise_keys))
    print(f"\n{'model':<8}{'steps':>6}{'nfe':>6}{'gen_ppl':>10}{'entropy':>9}{'s/sample':>10}")
    for r in rows:
        print(f"{r['model']:<8}{r['steps']:>6}{r['nfe']:>6.0f}{r['gen_ppl']:>10.3f}{r['entropy_bits']:>9.3f}"
              f"{r['seconds'] / args.num_samples:>10.4f}")
    mdlm = [r for r in rows if r["model"] == "mdlm"]
    best = min(mdlm, key=lambda r: (r["gen_ppl"], r["seconds"]))  # MDLM's best quality, fastest setting there
    reached = [r for r in rows if r["model"] == "cosmos" and r["gen_ppl"] <= best["gen_ppl"]]
    fastest = min(reached, key=lambda r: r["seconds"]) if reached else None  # time to MDLM's best quality
    speed = {"mdlm_best_steps": best["steps"], "mdlm_best_gen_ppl": best["gen_ppl"],
             "mdlm_best_seconds": best["seconds"],
             "cosmos": None if fastest is None else {k: fastest[k] for k in ("steps", "gen_ppl", "seconds")},
             "speedup": None if fastest is None else best["seconds"] / fastest["seconds"]}
    by_key = {(r["compression"], r["augmented"]): r for r in recon}
    targets = {"ae_4x_token_accuracy_ge_0.99": by_key.get((4, True), {}).get("token_accuracy", 0) >= 0.99,
               "ae_8x_token_accuracy_ge_0.95": by_key.get((8, True), {}).get("token_accuracy", 0) >= 0.95,
               "cosmos_2x_faster_than_mdlm_at_its_best": (speed["speedup"] or 0) >= 2.0}
    print("\ntime to MDLM's best Gen PPL (the fastest cosmos setting at or below it):", speed)
    print("training seconds:", {k: round(v, 1) for k, v in seconds.items()})
    print("targets:", targets)
    write_result({"benchmark": "cosmos", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
                  "cpu_count": os.cpu_count(), "backend": jax.default_backend(), "ae_steps": args.ae_steps,
                  "diffusion_steps": args.diffusion_steps, "mdlm_steps": args.mdlm_steps,
                  "num_samples": args.num_samples, "judge": workdir("shk_ar_judge"), "reconstruction": recon,
                  "rows": rows, "speed": speed, "train_seconds": seconds, "targets": targets}, args.output)


if __name__ == "__main__":
    main()
