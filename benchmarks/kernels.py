"""Attention kernels vs the XLA reference (and cuDNN on GPU): error everywhere, time where the kernel really runs.

For every length and mask mode it measures the forward `attention(...)` and the forward + backward
(`jax.value_and_grad` of sum(out * cotangent) w.r.t. q, k, v), then cached decoding attention (a block of
--block_size queries against a KV cache of Lmax = length, filled to n = 0, length / 2 and length - block) for
batch --batch and batch 1 (the latency case).

On GPU / TPU the Pallas kernels (`pallas`) are timed against `xla`, and on GPU the attention rows also time
`jax.nn.dot_product_attention(implementation="cudnn")`. On CPU the kernels only run interpreted
(`pallas_interpret`), which checks correctness but says nothing about speed: there only the error is measured
(forward + backward at the smallest length only, to keep it fast) and only the reference is timed.

Timing (`median_seconds`): the median of --repeats timed calls of one jitted function that applies the op
--iterations times in a `lax.fori_loop` (each iteration's first input nudged by the previous output, so nothing
is hoisted out of the loop), divided by --iterations. Sampling runs these ops inside `lax.scan`, so this is the
cost that matters there; timing separate Python calls measures dispatch (tens of microseconds) instead.
The error is that of one plain call.

A measurement that fails (an impl this backend cannot run, cuDNN refusing a mask, out of memory) is recorded as an
error string in its row and the script goes on. The last stdout line is one JSON object (also written to --output).

  python benchmarks/kernels.py [--lengths 1024,2048 --batch 4 --heads 12 --head_dim 64 --repeats 20]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import write_result

from dlm_jax.kernels import attention as attention_lib
from dlm_jax.kernels import reference

MASK_MODES = ("full", "causal", "block_causal", "bd3_train")
TOLERANCE = {"bfloat16": 2e-2, "float16": 2e-2, "float32": 2e-3}  # rel error for "the kernel agrees"
ERROR_CHARS = 300  # error strings in the rows are cut to this length


def looped(fn: Callable, iterations: int) -> Callable:
    """fn applied `iterations` times in one lax.fori_loop; each time the first argument is moved by 1e-3 x the
    first output leaf (same shape: attention out, dq, cached out), so XLA can neither hoist nor merge the calls."""

    def run(first, *rest):
        def body(_, x):
            out = jax.tree.leaves(fn(x, *rest))[0]
            return x + (1e-3 * out.astype(jnp.float32)).astype(x.dtype)

        return jax.lax.fori_loop(0, iterations, body, first)

    return run


def median_seconds(fn: Callable, args: tuple, repeats: int, iterations: int) -> float:
    """Median over `repeats` of the seconds of one fn(*args), taken from `looped(fn, iterations)`."""
    compiled = jax.jit(looped(fn, iterations)).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        samples.append((time.perf_counter() - start) / iterations)
    return float(np.median(samples))


@jax.jit
def _rel_error_leaf(got: jax.Array, want: jax.Array) -> jax.Array:
    diff = got.astype(jnp.float32) - want.astype(jnp.float32)
    want_norm = jnp.sqrt(jnp.sum(jnp.square(want.astype(jnp.float32))))
    return jnp.sqrt(jnp.sum(jnp.square(diff))) / jnp.maximum(want_norm, 1e-30)


def rel_error(got: Any, want: Any) -> float:
    """Largest Frobenius relative error ||got - want|| / ||want|| over the leaves of two matching pytrees."""
    return max(float(_rel_error_leaf(g, w)) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


def describe_error(error: Exception) -> str:
    """One line for a row: the exception type and the start of its message."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}"[:ERROR_CHARS]


def run_impl(fn: Callable, args: tuple, timed: bool, repeats: int, iterations: int) -> tuple[Any, float | None]:
    """(output of one jit(fn)(*args), median seconds per call or None when not timed)."""
    out = jax.block_until_ready(jax.jit(fn)(*args))
    return out, (median_seconds(fn, args, repeats, iterations) if timed else None)


def compare(fns: dict[str, Callable], args: tuple, timed: set[str], timing: tuple[int, int], row: dict) -> dict:
    """Runs each impl of `fns` ("xla" first: the reference) on args and fills `row` with seconds, the rel error of
    "kernel" and "cudnn" vs "xla", speedup = xla / kernel seconds, and per-impl error strings."""
    errors, outputs = {}, {}
    for impl, fn in fns.items():
        try:
            outputs[impl], row[f"{impl}_seconds"] = run_impl(fn, args, impl in timed, *timing)
        except Exception as e:  # noqa: BLE001 -- recorded in the row; the benchmark goes on
            errors[impl] = describe_error(e)
            row[f"{impl}_seconds"] = None
    want = outputs.pop("xla", None)
    for impl, got in outputs.items():
        key = "rel_error" if impl == "kernel" else f"{impl}_rel_error"
        try:
            row[key] = None if want is None else rel_error(got, want)
        except Exception as e:  # noqa: BLE001
            errors[f"{impl}_rel_error"] = describe_error(e)
            row[key] = None
    row.setdefault("rel_error", None)
    xla_s, kernel_s = row.get("xla_seconds"), row.get("kernel_seconds")
    row["speedup"] = xla_s / kernel_s if xla_s and kernel_s else None
    row["errors"] = errors
    del want, outputs
    return row


def attention_fn(mode: str, impl: str, block_size: int) -> Callable:
    """(q, k, v) -> out of `attention_lib.attention` with this impl."""
    return lambda q, k, v: attention_lib.attention(q, k, v, mask_mode=mode, impl=impl, block_size=block_size)


def cudnn_attention_fn(mode: str, block_size: int) -> Callable:
    """(q, k, v) -> out of jax.nn.dot_product_attention on cuDNN; causal as is_causal, other masks as a boolean
    [1, 1, L, L] mask (cuDNN may refuse them: the row then records the error)."""

    def fn(q, k, v):
        if mode == "causal":
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        mask = reference.attention_bias_mask(mode, q.shape[1], k.shape[1], block_size)
        mask = None if mask is None else mask[None, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")

    return fn


def cached_attention_fn(impl: str) -> Callable:
    """(q, k, v, k_cache, v_cache, n) -> out of `attention_lib.cached_attention` (full mask inside the block)."""
    return lambda q, k, v, k_cache, v_cache, n: attention_lib.cached_attention(
        q, k, v, k_cache, v_cache, n, block_mask_mode="full", impl=impl)


def fwd_bwd_fn(forward: Callable) -> Callable:
    """(q, k, v, cotangent) -> (loss, (dq, dk, dv)) of loss = sum(forward(q, k, v) * cotangent) in float32."""

    def loss(q, k, v, cotangent):
        return jnp.sum(forward(q, k, v).astype(jnp.float32) * cotangent)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def grads_only(fn: Callable) -> Callable:
    """Drops the loss (a sum of random-sign terms, near zero: its relative error means nothing)."""
    return lambda *args: fn(*args)[1]


def attention_rows(length: int, args: argparse.Namespace, backend: str, kernel_impl: str, dtype: Any,
                   with_fwd_bwd: bool) -> list[dict]:
    """Forward (and forward + backward) rows of every mask mode at one length."""
    keys = jax.random.split(jax.random.PRNGKey(length), 4)
    shape = (args.batch, length, args.heads, args.head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
    cotangent = jax.random.normal(keys[3], shape, jnp.float32)
    timed = {"xla"} if backend == "cpu" else {"xla", "kernel", "cudnn"}
    rows = []
    for mode in args.modes:
        forwards = {"xla": attention_fn(mode, "xla", args.block_size),
                    "kernel": attention_fn(mode, kernel_impl, args.block_size)}
        if backend == "gpu" and not args.skip_cudnn:
            forwards["cudnn"] = cudnn_attention_fn(mode, args.block_size)
        base = {"mode": mode, "length": length, "batch": args.batch}
        print(f"  attention {mode} L={length}", flush=True)
        rows.append(compare(forwards, (q, k, v), timed, (args.repeats, args.iterations),
                            {"op": "attention_fwd", **base}))
        if with_fwd_bwd:
            fns = {impl: grads_only(fwd_bwd_fn(fn)) for impl, fn in forwards.items()}
            rows.append(compare(fns, (q, k, v, cotangent), timed, (args.repeats, args.iterations),
                                {"op": "attention_fwd_bwd", **base}))
        gc.collect()
    del q, k, v, cotangent
    return rows


def cached_rows(length: int, batch: int, args: argparse.Namespace, backend: str, kernel_impl: str,
                dtype: Any) -> list[dict]:
    """Cached-attention rows at one cache length (Lmax = length) and batch, for three cache fills n."""
    keys = jax.random.split(jax.random.PRNGKey(length + batch), 5)
    block = (batch, args.block_size, args.heads, args.head_dim)
    cache = (batch, length, args.heads, args.head_dim)
    qb, kb, vb = (jax.random.normal(key, block, jnp.float32).astype(dtype) for key in keys[:3])
    k_cache, v_cache = (jax.random.normal(key, cache, jnp.float32).astype(dtype) for key in keys[3:])
    # n is an argument (traced), so each impl is compiled once per (length, batch) and serves every fill
    fns = {label: cached_attention_fn(impl) for label, impl in (("xla", "xla"), ("kernel", kernel_impl))}
    timed = {"xla"} if backend == "cpu" else {"xla", "kernel"}
    rows = []
    fills = {"n=0": 0, "n=L/2": length // 2, "n=L-block": length - args.block_size}
    for fill, n in fills.items():
        print(f"  cached {fill} L={length} batch={batch}", flush=True)
        row = {"op": "cached", "mode": "full", "fill": fill, "cache_len": n, "length": length, "batch": batch}
        rows.append(compare(fns, (qb, kb, vb, k_cache, v_cache, jnp.int32(n)), timed, (args.repeats, args.iterations),
                            row))
    del qb, kb, vb, k_cache, v_cache
    gc.collect()
    return rows


def summary_key(row: dict) -> str:
    """(op kind, mode) of a row; cached rows also name the batch and the cache fill."""
    if row["op"] == "cached":
        return f"cached/{row['mode']}/batch={row['batch']}/{row['fill']}"
    return f"{row['op']}/{row['mode']}"


def summarize(rows: list[dict], tolerance: float) -> dict[str, list[int]]:
    """For each (op kind, mode): the lengths where the kernel was faster than xla and within tolerance."""
    summary: dict[str, list[int]] = {}
    for row in rows:
        lengths = summary.setdefault(summary_key(row), [])
        rel = row.get("rel_error")
        if row.get("speedup") and row["speedup"] > 1 and rel is not None and rel < tolerance:
            lengths.append(row["length"])
    return summary


def save_partial(rows: list[dict], path: str) -> None:
    """The rows so far, written to `path` (replaced by the full result at the end)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": "kernels", "partial": True, "rows": rows}, f, indent=2)


def _ms(seconds: float | None, width: int) -> str:
    return f"{1e3 * seconds:{width}.3f}" if seconds is not None else f"{'-':>{width}s}"


def _error_cell(row: dict, key: str, impl: str) -> str:
    if row.get(key) is not None:
        return f"{row[key]:9.2e}"
    return f"{'ERR' if impl in row['errors'] or 'xla' in row['errors'] else '-':>9s}"


def print_table(rows: list[dict], with_cudnn: bool) -> None:
    """The rows as a table (ERR: that impl failed, listed below the table; -: not measured)."""
    header = f"{'op':36s} {'length':>6s} {'batch':>5s} {'rel err':>9s} {'xla ms':>9s} {'kernel ms':>10s}"
    print(header + f" {'speedup':>8s}" + (f" {'cudnn ms':>9s} {'cudnn err':>9s}" if with_cudnn else ""))
    for r in rows:
        op = f"{r['op']}/{r['mode']}" + (f" {r['fill']}" if r["op"] == "cached" else "")
        rel = _error_cell(r, "rel_error", "kernel")
        speedup = f"{r['speedup']:8.2f}" if r.get("speedup") else f"{'-':>8s}"
        line = (f"{op:36s} {r['length']:6d} {r['batch']:5d} {rel} {_ms(r.get('xla_seconds'), 9)} "
                f"{_ms(r.get('kernel_seconds'), 10)} {speedup}")
        if with_cudnn:
            line += f" {_ms(r.get('cudnn_seconds'), 9)} {_error_cell(r, 'cudnn_rel_error', 'cudnn')}"
        print(line)
    failed = [r for r in rows if r["errors"]]
    if failed:
        print("errors:")
        for r in failed:
            for impl, message in r["errors"].items():
                print(f"  {r['op']}/{r['mode']} L={r['length']} B={r['batch']} {impl}: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=None,
                        help="comma list; default 1024,2048,4096,8192 on GPU / TPU, 128,256 on CPU")
    parser.add_argument("--modes", default=",".join(MASK_MODES), help="comma list of attention mask modes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=16, help="block of block_causal / bd3_train, cached queries")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (median); default 10 GPU/TPU, 3 CPU")
    parser.add_argument("--iterations", type=int, default=None, help="op applications per timed call (in-jit loop); "
                        "default 20 GPU/TPU, 1 CPU")
    parser.add_argument("--skip_attention", action="store_true", help="only the cached-attention rows")
    parser.add_argument("--skip_cudnn", action="store_true", help="GPU: leave out the cuDNN column")
    parser.add_argument("--skip_cached", action="store_true", help="leave out the cached-attention rows")
    parser.add_argument("--output", default="bench_out/kernels.json")
    args = parser.parse_args()

    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    kernel_impl = "pallas_interpret" if on_cpu else "pallas"
    args.lengths = [int(x) for x in (args.lengths or ("128,256" if on_cpu else "1024,2048,4096,8192")).split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    args.repeats = args.repeats or (3 if on_cpu else 10)
    args.iterations = args.iterations or (1 if on_cpu else 20)
    dtype = jnp.dtype(args.dtype)
    tolerance = TOLERANCE.get(args.dtype, 2e-2)
    with_cudnn = backend == "gpu" and not args.skip_cudnn
    device = jax.devices()[0].device_kind
    print(f"backend {backend} ({device}), jax {jax.__version__}, kernel impl {kernel_impl}, batch {args.batch}, "
          f"heads {args.heads}, head_dim {args.head_dim}, {args.dtype}, block {args.block_size}, "
          f"lengths {args.lengths}, repeats {args.repeats} x {args.iterations} in-jit iterations", flush=True)

    rows = []
    for length in args.lengths:
        # CPU: forward + backward of the interpreted kernel is slow, so only at the smallest length
        with_fwd_bwd = not on_cpu or length == min(args.lengths)
        if not args.skip_attention:
            rows += attention_rows(length, args, backend, kernel_impl, dtype, with_fwd_bwd)
        if not args.skip_cached:
            for batch in dict.fromkeys((args.batch, 1)):
                rows += cached_rows(length, batch, args, backend, kernel_impl, dtype)
        gc.collect()
        save_partial(rows, args.output)  # a run stopped at its time limit keeps the lengths it finished
        print(f"length {length}: done", flush=True)

    print_table(rows, with_cudnn)
    if on_cpu:
        print("CPU: the kernels run interpreted here, so only their error is meaningful; time them on a GPU / TPU")
    summary = summarize(rows, tolerance)
    print(f"kernel faster than xla and rel err < {tolerance:g} at lengths:")
    for key, lengths in summary.items():
        print(f"  {key:40s} {lengths}")
    errors = [r["rel_error"] for r in rows if r.get("rel_error") is not None]
    result = {"benchmark": "kernels", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
              "device": device, "backend": backend, "jax": jax.__version__, "kernel_impl": kernel_impl,
              "settings": vars(args), "tolerance": tolerance, "rows": rows,
              "max_rel_error": max(errors) if errors else None,
              "num_errors": sum(len(r["errors"]) for r in rows), "summary": summary}
    write_result(result, args.output)


if __name__ == "__main__":
    main()
