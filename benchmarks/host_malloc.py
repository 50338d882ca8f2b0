"""Host memory and the CPU train step: glibc's default malloc against glibc.malloc.hugetlb=1 (what `dlm-jax` sets).

Each (setting, dtype) runs in its own fresh process with that GLIBC_TUNABLES, one at a time: the model of
benchmarks/vs_pytorch.py (the same `TrainStep`), --warmup steps, then --steps timed steps; per step the wall time,
the minor page faults and the kernel (sys) time, and the resident memory after the last step. Rows alternate over
--rounds rounds (fresh processes each round); a row's figures are medians. XLA:CPU allocates and frees its
temporaries every step; glibc returns the large ones to the kernel, which faults them in again 4 KiB at a time on
the next step. Prints a table, then one JSON object as the last stdout line (also written to --output).

  python benchmarks/host_malloc.py [--layers 4 --d_model 128 --heads 4 --mlp_dim 512 --seq_len 128 --batch_size 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from common import write_result

SETTINGS = {"default": "glibc.malloc.hugetlb=0", "hugetlb": "glibc.malloc.hugetlb=1"}


def child(args: argparse.Namespace) -> None:
    """Runs in the row's process: prints one JSON line of per-step figures."""
    from vs_pytorch import jax_step

    step, _, _ = jax_step(args.dtype, args)
    for _ in range(args.warmup):
        step()
    seconds, faults, system = [], [], []
    for _ in range(args.steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(after.ru_stime - before.ru_stime)
    with open("/proc/self/statm") as f:
        rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    print(json.dumps({"step_seconds": seconds, "minor_faults": faults, "sys_seconds": system, "rss_mb": rss_mb}))


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([x for run in runs for x in run[key]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, default in (("layers", 4), ("d_model", 128), ("heads", 4), ("mlp_dim", 512), ("seq_len", 128),
                         ("batch_size", 32), ("warmup", 2), ("steps", 4), ("rounds", 2)):
        parser.add_argument(f"--{key}", type=int, default=default)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--output", default="bench_out/host_malloc.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.jax_layers = "unrolled"
    if args.child:
        return child(args)
    rows = {(s, d): [] for d in args.dtypes.split(",") for s in SETTINGS}
    for r in range(args.rounds):
        for setting, dtype in rows:
            env = dict(os.environ, GLIBC_TUNABLES=SETTINGS[setting])
            out = subprocess.run([sys.executable, __file__, "--child", f"--dtype={dtype}", *sys.argv[1:]], env=env,
                                 capture_output=True, text=True, check=True, cwd=os.path.dirname(__file__))
            rows[setting, dtype].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    tokens = args.batch_size * args.seq_len
    result = {}
    print(f"{'malloc':8s} {'dtype':9s} {'step s':>7s} {'tokens/s':>9s} {'faults/step':>11s} {'sys s/step':>10s} "
          f"{'RSS MB':>7s}")
    for (setting, dtype), runs in rows.items():
        row = {"step_seconds": _median(runs, "step_seconds"), "minor_faults_per_step": _median(runs, "minor_faults"),
               "sys_seconds_per_step": _median(runs, "sys_seconds"),
               "rss_mb": float(np.median([r["rss_mb"] for r in runs]))}
        row["tokens_per_second"] = tokens / row["step_seconds"]
        result[f"{setting}_{dtype}"] = row
        print(f"{setting:8s} {dtype:9s} {row['step_seconds']:7.3f} {row['tokens_per_second']:9.0f} "
              f"{row['minor_faults_per_step']:11.0f} {row['sys_seconds_per_step']:10.3f} {row['rss_mb']:7.0f}")
    speedups = {d: result[f"default_{d}"]["step_seconds"] / result[f"hugetlb_{d}"]["step_seconds"]
                for d in args.dtypes.split(",")}
    for dtype, ratio in speedups.items():
        print(f"{dtype}: hugetlb step {ratio:.2f}x faster than default")
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    write_result({"benchmark": "host_malloc", "date": date, "config": {k: v for k, v in vars(args).items()
                                                                       if k not in ("child", "dtype")},
                  "settings": SETTINGS, "rows": result, "hugetlb_speedup": speedups}, args.output)


if __name__ == "__main__":
    main()
