"""The speed / quality frontier of fast decoding (issue 15, DESIGN.md section 8): every parallel decoding rule at a
few thresholds, and the speculative decoders, against AR decoding with its KV cache, same backbone, same machine.

Models (the shakespeare recipes, trained here once and reused from --root): AR (configs/shakespeare_ar.py), block
diffusion L' = 4 from scratch (configs/shakespeare_block.py), block diffusion adapted from that AR
(configs/shakespeare_block_from_ar.py), MDLM (configs/shakespeare_mdlm.py), MDLM adapted from the AR
(configs/shakespeare_mdlm_from_ar.py, `mdlm_from_ar`: semi-AR rules and DiffuSpec); the judge is the AR recipe
trained with seed 1 (it never feeds a decoder). For every (batch, length): tokens/s (compile excluded), NFE, Gen PPL
and unigram entropy of `--num_samples` samples per setting at one temperature; a table, bench_out/frontier.{json,png}.
The last stdout line is one JSON object; its `best` is the fastest diffusion decoder whose Gen PPL is within 10% of
the AR model's own samples (either side: a greedy decoder's repetitive text scores far below them) at batch 1 and
the largest length (null when none is); `closest` is the diffusion decoder whose Gen PPL is nearest the AR's there.

  python benchmarks/frontier.py --data ../shared/data/tinyshakespeare.txt [--lengths 128] [--batches 1,8] \
      [--models block_from_ar,block,mdlm,mdlm_from_ar]

The recipes train at data.seq_len = 128; `--seq_len 512 --lengths 128,512` trains the models at 512 (batch 8: the
same tokens per step; workdirs named with it) for the L = 512 half of the grid.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import numpy as np
from common import ensure_trained, sample_spec, write_result

from dlm_jax.eval.genppl import Judge
from dlm_jax.eval.sweep import generation_row
from dlm_jax.experiment import load_sampler_components, load_workdir_config, restore_for_inference

# (model, sampler, {options}): the one-token-per-step decoders first, then each rule at its thresholds
RULE_GRID = (
    ("topk_confidence", {}),  # the floor of every rule: one token per forward at steps = length
    ("threshold", {"min_confidence": 0.9}), ("threshold", {"min_confidence": 0.7}),
    ("threshold", {"min_confidence": 0.5}),
    ("factor", {"factor": 1.0}), ("factor", {"factor": 2.0}),
    ("prophet", {"gap": 7.5}), ("sched", {"gap": 7.5, "gap_end": 2.5}),
    ("ccd", {"stable_steps": 2}), ("rcr", {}), ("saber", {}),
)


def settings(args: argparse.Namespace, workdirs: dict[str, str]) -> list[tuple[str, str, dict]]:
    rows: list[tuple[str, str, dict]] = [("ar", "ar", {})]
    for model in ("block_from_ar", "block"):
        rows += [(model, "block", {"inner": inner, **opts}) for inner, opts in RULE_GRID]
        rows += [(model, "freedave", {"draft_size": 4}), (model, "diffuspec", {"verifier": workdirs["ar"]})]
    rows += [("mdlm", "semi_ar", {"inner": inner, "block_length": 16, **opts})
             for inner, opts in RULE_GRID[:2] + RULE_GRID[4:5]]
    rows += [("mdlm", cache, {"inner": "threshold", "block_length": 16, "min_confidence": 0.9})
             for cache in ("dual_cache", "dkv_cache")]
    # the MDLM adapted from the AR (shifted logits: no position-indexed KV caches)
    rows += [("mdlm_from_ar", "semi_ar", {"inner": inner, "block_length": 16, **opts}) for inner, opts in RULE_GRID]
    rows += [("mdlm_from_ar", "diffuspec", {"verifier": workdirs["ar"]})]
    return [r for r in rows if r[0] == "ar" or r[0] in args.models.split(",")]  # AR: the reference point


def train_models(args: argparse.Namespace) -> dict[str, str]:
    """The workdirs of the AR, its judge and the requested models (each trained unless its last checkpoint is
    there); --seq_len other than the recipes' 128 trains them at that length, at the recipes' tokens per step
    (batch 32 x 128), into workdirs named with it."""
    suffix = "" if args.seq_len == 128 else f"_L{args.seq_len}"
    overrides = () if args.seq_len == 128 else (f"--config.data.seq_len={args.seq_len}",
                                                f"--config.train.batch_size={max(1, 32 * 128 // args.seq_len)}")
    wanted = set(args.models.split(","))
    workdirs = {name: os.path.join(args.root, f"shk_{name}{suffix}") for name in ("ar", "ar_judge", "block", "mdlm")}
    # the same workdir benchmarks/adaptation.py --ar_workdir=ROOT/shk_ar trains (reused by either)
    for name in ("block_from_ar", "mdlm_from_ar"):
        workdirs[name] = os.path.join(args.root, f"adapt_{name}_{args.train_steps}_{args.adapt_steps}{suffix}")
    for name, recipe in (("ar", "shakespeare_ar"), ("block", "shakespeare_block"), ("mdlm", "shakespeare_mdlm")):
        if name == "ar" or name in wanted:
            ensure_trained(f"configs/{recipe}.py", workdirs[name], args.data, args.train_steps, overrides)
    ensure_trained("configs/shakespeare_ar.py", workdirs["ar_judge"], args.data, args.train_steps,
                   ("--config.seed=1", *overrides))
    if "block_from_ar" in wanted:
        ensure_trained("configs/shakespeare_block_from_ar.py", workdirs["block_from_ar"], args.data,
                       args.adapt_steps, (f"--config.train.init_from={workdirs['ar']}", *overrides))
    if "mdlm_from_ar" in wanted:  # as benchmarks/adaptation.py: the attention annealed over a third of the steps
        ensure_trained("configs/shakespeare_mdlm_from_ar.py", workdirs["mdlm_from_ar"], args.data, args.adapt_steps,
                       (f"--config.train.init_from={workdirs['ar']}",
                        f"--config.mdlm.anneal_steps={max(1, args.adapt_steps // 3)}", *overrides))
    return workdirs


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["batch_size"], r["length"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (batch, length) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if (r["batch_size"], r["length"]) == (batch, length)]
        for model in dict.fromkeys(r["model"] for r in mine):
            pts = [r for r in mine if r["model"] == model]
            ax.scatter([r["tokens_per_second"] for r in pts], [r["gen_ppl"] for r in pts], label=model,
                       marker="*" if model == "ar" else "o", s=120 if model == "ar" else 25)
            for r in pts:
                ax.annotate(r["label"], (r["tokens_per_second"], r["gen_ppl"]), fontsize=5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens / s (sampling, compile excluded)")
        ax.set_ylabel("Gen PPL (independent AR judge)")
        ax.set_title(f"batch {batch}, L = {length}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def label(sampler: str, options: dict) -> str:
    rule = options.get("inner", sampler)
    knobs = ",".join(f"{k}={v}" for k, v in options.items() if k not in ("inner", "block_length", "verifier"))
    return f"{sampler}:{rule}" + (f"({knobs})" if knobs else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--root", default="bench_out", help="where the trained workdirs live (reused)")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--adapt_steps", type=int, default=100, help="fine-tune steps of the AR -> block model")
    parser.add_argument("--lengths", default="128", help="sample lengths, at most --seq_len")
    parser.add_argument("--seq_len", type=int, default=128, help="train every model at this length (L = 512 needs 512)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--num_samples", type=int, default=8, help="samples per setting (Gen PPL pools them)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--models", default="block_from_ar,block,mdlm,mdlm_from_ar",
                        help="the diffusion models to decode with (AR always runs)")
    parser.add_argument("--output", default="bench_out/frontier.json")
    args = parser.parse_args()
    workdirs = train_models(args)
    judge = Judge(workdirs["ar_judge"])
    restored = {}
    rows = []
    for length in map(int, args.lengths.split(",")):
        template = np.full((length,), -1, np.int32)
        for batch in map(int, args.batches.split(",")):
            for model, sampler, options in settings(args, workdirs):
                if model not in restored:
                    restored[model] = restore_for_inference(workdirs[model], load_workdir_config(workdirs[model]))[:2]
                exp, params = restored[model]
                if sampler not in exp.family.samplers:
                    continue
                spec = sample_spec(exp, sampler, args.num_samples, length, steps=length,
                                   temperature=args.temperature, **options)
                load_sampler_components(exp, spec)  # DiffuSpec's AR verifier
                _, row = generation_row(exp, params, spec, template, 0, batch, judge, False)
                row = {"model": model, "label": label(sampler, options), "options": options, **row}
                rows.append(row)
                print(f"L={length:4d} batch={batch} {model:14s} {row['label']:44s} nfe {row['nfe']:7.1f}  "
                      f"tok/s {row['tokens_per_second']:8.1f}  gen_ppl {row['gen_ppl']:8.2f}  "
                      f"entropy {row['entropy_bits']:.2f}", flush=True)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    plot(rows, os.path.splitext(args.output)[0] + ".png")
    result = summarize(rows, args)
    write_result(result, args.output)


def summarize(rows: list[dict], args: argparse.Namespace) -> dict:
    """The headline figures: `best` (see the module doc), the NFE cut of the threshold rule on MDLM semi-AR, and
    every row's speed-up over AR at its (batch, length)."""
    for r in rows:
        ar = next(a for a in rows if a["model"] == "ar" and (a["batch_size"], a["length"]) ==
                  (r["batch_size"], r["length"]))
        r["speedup_vs_ar"] = r["tokens_per_second"] / ar["tokens_per_second"]
        r["gen_ppl_over_ar"] = r["gen_ppl"] / ar["gen_ppl"]
    length = max(r["length"] for r in rows)
    here = [r for r in rows if r["batch_size"] == min(r["batch_size"] for r in rows) and r["length"] == length]
    ar = next(r for r in here if r["model"] == "ar")
    diffusion = [r for r in here if r["model"] != "ar"]
    # within 10% on both sides: greedy decoders (FreeDave) write repetitive text whose Gen PPL is far *below* the
    # AR's own samples (low entropy), which is not the AR's quality either
    within = [r for r in diffusion if abs(r["gen_ppl"] / ar["gen_ppl"] - 1.0) <= 0.1]

    def entry(r: dict) -> dict:
        return {"sampler": r["label"], "model": r["model"], "options": r["options"],
                "tokens_per_second": r["tokens_per_second"], "gen_ppl": r["gen_ppl"], "nfe": r["nfe"],
                "ar_tokens_per_second": ar["tokens_per_second"], "ar_gen_ppl": ar["gen_ppl"],
                "speedup_vs_ar": r["speedup_vs_ar"], "batch_size": r["batch_size"], "length": r["length"]}

    best = entry(max(within, key=lambda r: r["tokens_per_second"])) if within else None
    closest = entry(min(diffusion, key=lambda r: abs(r["gen_ppl"] / ar["gen_ppl"] - 1.0))) if diffusion else None
    nfe_cut = {}
    for r in rows:
        if r["label"] == "semi_ar:threshold(min_confidence=0.9)":
            base = next(b for b in rows if b["model"] == r["model"] and b["label"] == "semi_ar:topk_confidence" and
                        (b["batch_size"], b["length"]) == (r["batch_size"], r["length"]))
            nfe_cut[f"{r['model']}_batch{r['batch_size']}_L{r['length']}"] = {
                "nfe_ratio": base["nfe"] / r["nfe"], "gen_ppl_change": r["gen_ppl"] / base["gen_ppl"] - 1.0}
    return {"benchmark": "frontier", "date": datetime.date.today().isoformat(), "machine": platform.processor() or
            platform.machine(), "temperature": args.temperature, "num_samples": args.num_samples,
            "train_steps": args.train_steps, "adapt_steps": args.adapt_steps, "best": best, "closest": closest,
            "threshold_nfe_cut_mdlm_semi_ar": nfe_cut, "rows": rows}


if __name__ == "__main__":
    main()
