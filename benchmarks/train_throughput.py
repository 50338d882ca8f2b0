"""Train-step throughput and MFU of MDLM and AR on one backbone (default 6 layers x 512, seq 256).

MFU = model FLOPs/s (3x forward matmul FLOPs, attention included) / peak FLOP/s, where the peak is measured
in the same run by a large float32 matmul. Prints a table, then one JSON object as the last stdout line.

  python benchmarks/train_throughput.py [--batch_size=16] [--steps=5] [--output=bench_out/train_throughput.json]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import write_result

from dlm_jax.experiment import build_experiment
from dlm_jax.families import base_config
from dlm_jax.models.transformer import flops_per_token
from dlm_jax.train import sharding
from dlm_jax.train.loop import make_train_step
from dlm_jax.train.state import create_train_state


def peak_flops(n: int = 4096, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n float32 matmul (the machine's practical peak)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure(family: str, scan_layers: bool, args: argparse.Namespace) -> dict:
    c = base_config()
    c.model.family = family
    c.model.num_layers, c.model.d_model, c.model.num_heads = args.layers, args.d_model, 8
    c.model.mlp_dim = 4 * args.d_model
    c.model.mlp_type = args.mlp_type
    c.model.time_conditioning = False
    c.model.dtype = args.dtype
    c.model.scan_layers = scan_layers
    c.data.seq_len = args.seq_len
    c.train.batch_size = args.batch_size
    c.train.ema_decay = 0.0
    c.mesh.data = -1
    exp = build_experiment(c)
    batch_sharding = sharding.batch_sharding(exp.mesh)
    rng = np.random.default_rng(0)
    local = {"tokens": rng.integers(0, 256, (args.batch_size, args.seq_len)).astype(np.int32),
             "loss_mask": np.ones((args.batch_size, args.seq_len), np.float32)}
    with sharding.mesh_context(exp.mesh):
        state = create_train_state(exp.family.init_params, exp.optimizer, c, exp.state_shardings)
        step = make_train_step(exp, batch_sharding)
        batch = sharding.global_batch(local, batch_sharding)
        for _ in range(2):  # compile + warm-up
            state, metrics = step(state, batch, exp.frozen)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            state, metrics = step(state, batch, exp.frozen)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    tokens_per_second = args.batch_size * args.seq_len / seconds
    model_flops = flops_per_token(exp.family.model.cfg, args.seq_len) * tokens_per_second
    return {"family": family, "layers": "scan" if scan_layers else "unrolled", "step_seconds": seconds,
            "tokens_per_second": tokens_per_second,
            "model_tflops": model_flops / 1e12, "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mlp_type", default="swiglu", help="swiglu (the backbone default) or gelu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", default="bench_out/train_throughput.json")
    args = parser.parse_args()

    peak_before = peak_flops()
    # nn.scan over layers (the default: one compiled block, fast compiles at scale) and unrolled layers
    rows = [measure(family, scan, args) for scan in (True, False) for family in ("mdlm", "ar")]
    peak = max(peak_before, peak_flops())  # measured on both sides of the runs: the machine is shared
    for row in rows:
        row["mfu"] = row["model_tflops"] * 1e12 / peak
    ratio = rows[0]["tokens_per_second"] / rows[1]["tokens_per_second"]
    best = max(row["mfu"] for row in rows)

    print(f"backend {jax.default_backend()} x{jax.device_count()}, {platform.processor() or platform.machine()}, "
          f"model {args.layers}x{args.d_model}, seq {args.seq_len}, batch {args.batch_size}, {args.dtype}")
    print(f"peak (f32 matmul): {peak / 1e12:.3f} TFLOP/s")
    print(f"{'family':8s} {'layers':>9s} {'step s':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for r in rows:
        print(f"{r['family']:8s} {r['layers']:>9s} {r['step_seconds']:8.3f} {r['tokens_per_second']:10.0f} "
              f"{r['model_tflops']:8.3f} {100 * r['mfu']:5.1f}%")
    print(f"MDLM / AR tokens/s (scan): {ratio:.3f}; best MFU {100 * best:.1f}%")
    result = {"benchmark": "train_throughput", "backend": jax.default_backend(), "devices": jax.device_count(),
              "config": vars(args), "peak_tflops": peak / 1e12, "rows": rows, "mdlm_over_ar_tokens_per_second": ratio,
              "best_mfu": best}
    write_result(result, args.output)


if __name__ == "__main__":
    main()
