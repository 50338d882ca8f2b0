"""Attention kernels vs the XLA reference: error everywhere, time where the kernel really runs (GPU / TPU).

On CPU the Pallas kernels only run interpreted (`pallas_interpret`), which checks correctness but says nothing
about speed, so on CPU this reports the error and the reference's own time; on GPU / TPU it times `pallas`
against `xla` for every mask mode (training attention) and for cached decoding attention.

  python benchmarks/kernels.py [--batch 4 --heads 8 --head_dim 64 --length 1024 --block_size 16]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import write_result

from dlm_jax.kernels import attention as attention_lib


def _time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _rel_error(got: jax.Array, want: jax.Array) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=None, help="default: 1024 on GPU/TPU, 256 on CPU")
    parser.add_argument("--block_size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--output", default="bench_out/kernels.json")
    args = parser.parse_args()

    backend = jax.default_backend()
    kernel_impl = "pallas_interpret" if backend == "cpu" else "pallas"
    length = args.length or (256 if backend == "cpu" else 1024)
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    shape = (args.batch, length, args.heads, args.head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
    rows = []
    for mode in ("full", "causal", "block_causal", "bd3_train"):
        run = {impl: jax.jit(lambda q, k, v, impl=impl, mode=mode: attention_lib.attention(
            q, k, v, mask_mode=mode, impl=impl, block_size=args.block_size)) for impl in ("xla", kernel_impl)}
        row = {"op": f"attention/{mode}", "rel_error": _rel_error(run[kernel_impl](q, k, v), run["xla"](q, k, v)),
               "xla_seconds": _time(run["xla"], q, k, v)}
        if backend != "cpu":
            row["kernel_seconds"] = _time(run[kernel_impl], q, k, v)
            row["speedup"] = row["xla_seconds"] / row["kernel_seconds"]
        rows.append(row)
    block = (args.batch, args.block_size, args.heads, args.head_dim)
    qb, kb, vb = (jax.random.normal(key, block, jnp.float32).astype(dtype) for key in keys[3:])
    for n in (0, length // 2, length - args.block_size):
        run = {impl: jax.jit(lambda q, k, v, kc, vc, n, impl=impl: attention_lib.cached_attention(
            q, k, v, kc, vc, n, block_mask_mode="full", impl=impl)) for impl in ("xla", kernel_impl)}
        inputs = (qb, kb, vb, k, v, jnp.int32(n))
        row = {"op": f"cached_attention/n={n}", "rel_error": _rel_error(run[kernel_impl](*inputs), run["xla"](*inputs)),
               "xla_seconds": _time(run["xla"], *inputs)}
        if backend != "cpu":
            row["kernel_seconds"] = _time(run[kernel_impl], *inputs)
            row["speedup"] = row["xla_seconds"] / row["kernel_seconds"]
        rows.append(row)

    print(f"backend {backend} ({jax.devices()[0].device_kind}), kernel impl {kernel_impl}, q/k/v {shape} {args.dtype}, "
          f"block {args.block_size}")
    print(f"{'op':28s} {'rel err':>9s} {'xla ms':>9s} {'kernel ms':>10s} {'speedup':>8s}")
    for r in rows:
        kernel = f"{1e3 * r['kernel_seconds']:10.3f} {r['speedup']:8.2f}" if "kernel_seconds" in r else (
            f"{'(interp.)':>10s} {'-':>8s}")
        print(f"{r['op']:28s} {r['rel_error']:9.2e} {1e3 * r['xla_seconds']:9.3f} {kernel}")
    if backend == "cpu":
        print("CPU: the kernels run interpreted here, so only the error is meaningful; time them on a GPU / TPU")
    result = {"benchmark": "kernels", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
              "device": jax.devices()[0].device_kind, "backend": backend, "jax": jax.__version__,
              "kernel_impl": kernel_impl, "settings": {**vars(args), "length": length}, "rows": rows,
              "max_rel_error": max(r["rel_error"] for r in rows)}
    write_result(result, args.output)


if __name__ == "__main__":
    main()
