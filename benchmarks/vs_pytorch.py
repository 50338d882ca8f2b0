"""Train-step speed of dlm-jax against the same model, loss and optimizer written in PyTorch, side by side.

The model of benchmarks/train_throughput.py with the recipes' backbone choices: pre-norm transformer, RMSNorm
(float32), rotary positions, SwiGLU, no biases, full attention, a linear head over the byte vocabulary (+ [MASK]);
the continuous-time MDLM loss (Sahoo et al. 2024: t antithetic on U[eps, 1], each token masked with prob t, SUBS
cross-entropy on the masked tokens weighted 1/t, averaged over tokens); AdamW (b1 0.9, b2 0.98, no weight decay)
after global-norm clipping at 1. Time conditioning, dropout and EMA are off. The batch is random bytes: speed only.

Rows (each skipped when its library is missing; PyTorch comes with the `bench` extra, see docs/benchmarks.md):
  jax float32 / bfloat16        dlm-jax's jitted train step (model.dtype; params stay float32), unrolled layers
                                (--jax_layers scan: nn.scan); the same `make_train_step` as `dlm-jax train`
  torch eager float32 / bf16    the PyTorch step; bf16 = torch.autocast(cpu, bfloat16) around the loss
  torch compiled float32 / bf16 the same loss under torch.compile (the optimizer step stays eager)
Each row lives in its own process (spawned; the others wait idle, so no thread pools contend). The float32 rows run
first, then the bf16 rows (only one dtype's processes alive at a time); within a dtype, after one compile / warm-up
step each, the rows run in alternation, --steps_per_round steps per row per round over --rounds rounds (the machine
is shared: alternating spreads its noise over the rows compared); a row's figure is its median step. --malloc
hugetlb runs every row (both libraries) with glibc's malloc on huge pages, as the `dlm-jax` command runs itself
(default: glibc's own; with several idle row processes holding memory, huge pages slowed the 6 x 512 dlm-jax step:
benchmarks/host_malloc.py measures one process at a time). A square matmul of --matmul_n in each library and dtype
is timed too (best of 5): the raw speed the steps build on. Prints a table, the ratios, then one JSON object as the
last stdout line (also written to --output).

  python benchmarks/vs_pytorch.py [--rows jax_f32,torch_eager_f32 --rounds 5 --layers 6 --d_model 512]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import write_result
from train_throughput import TrainStep

from dlm_jax.data import tokenizers
from dlm_jax.train.distributed import relaunch_with_huge_pages

ROWS = ("jax_f32", "jax_bf16", "torch_eager_f32", "torch_eager_bf16", "torch_compiled_f32", "torch_compiled_bf16")
T_EPS = 1e-3  # the mdlm section's t_eps
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> dict[str, bool]:
    """Which of the CPU features that matter for f32 / bf16 matmuls this machine has (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {flag: flag in flags for flag in CPU_FLAGS}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def jax_matmul_tflops(n: int, dtype: str) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * n**3 / best_seconds(lambda: jax.block_until_ready(matmul(a))) / 1e12


def torch_matmul_tflops(n: int, dtype: str) -> float:
    import torch

    a = torch.randn(n, n).to(getattr(torch, dtype))
    return 2 * n**3 / best_seconds(lambda: a @ a) / 1e12


def jax_step(dtype: str, args: argparse.Namespace) -> tuple[Callable[[], None], int, int]:
    """(one dlm-jax MDLM train step, the model's vocabulary size incl. [MASK], its parameter count)."""
    settings = argparse.Namespace(layers=args.layers, d_model=args.d_model, heads=args.heads, mlp_dim=args.mlp_dim,
                                  mlp_type="swiglu", norm="rmsnorm", dropout=0.0, dtype=dtype, remat="none",
                                  seq_len=args.seq_len, batch_size=args.batch_size, vocab_size=0)
    step = TrainStep("mdlm", "xla", args.jax_layers == "scan", settings)
    params = sum(x.size for x in jax.tree.leaves(step.state.params))
    return step.run, step.exp.family.model.cfg.vocab_size, params


def torch_step(compiled: bool, bf16: bool, vocab_size: int, args: argparse.Namespace) -> tuple[Callable[[], None],
                                                                                                 int]:
    """(One PyTorch train step of the same model and loss (vocab_size counts [MASK], the last id), its parameter
    count)."""
    import torch
    import torch.nn.functional as F  # noqa: N812 -- the PyTorch convention

    class RMSNorm(torch.nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(dim))

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return (h * self.scale).to(x.dtype)

    def rotary(x, cos, sin):  # x [B, H, L, D]: the two halves of D rotated as pairs
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            d, m = args.d_model, args.mlp_dim
            self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
            self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
            self.out = torch.nn.Linear(d, d, bias=False)
            self.gate = torch.nn.Linear(d, m, bias=False)
            self.up = torch.nn.Linear(d, m, bias=False)
            self.down = torch.nn.Linear(m, d, bias=False)

        def forward(self, x, cos, sin):
            b, length, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, args.heads, d // args.heads).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(rotary(q, cos, sin), rotary(k, cos, sin), v)
            x = x + self.out(h.transpose(1, 2).reshape(b, length, d))
            h = self.norm2(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class Transformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab_size, args.d_model)
            torch.nn.init.normal_(self.embed.weight, std=0.02)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(args.layers))
            self.norm = RMSNorm(args.d_model)
            self.head = torch.nn.Linear(args.d_model, vocab_size, bias=False)
            head_dim = args.d_model // args.heads
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
            angles = torch.arange(args.seq_len).float()[:, None] * inv_freq[None, :]
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

        def forward(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x, self.cos, self.sin)
            return self.head(self.norm(x)).float()

    mask_id = vocab_size - 1
    model = Transformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), weight_decay=0.0)

    def loss_fn(x0):  # continuous-time MDLM NELBO per token (linear schedule: alpha_t = 1 - t, weight 1/t)
        n = x0.shape[0]
        t = ((torch.rand(()) + torch.arange(n) / n) % 1.0) * (1 - T_EPS) + T_EPS  # antithetic
        masked = torch.rand(x0.shape) < t[:, None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(torch.where(masked, mask_id, x0))
        logits = logits.float().index_fill(-1, torch.tensor([mask_id]), -math.inf)  # SUBS
        nll = F.cross_entropy(logits.view(-1, vocab_size), x0.view(-1), reduction="none").view(x0.shape)
        return (torch.where(masked, nll, 0.0) / t[:, None]).sum() / x0.numel()

    loss = torch.compile(loss_fn) if compiled else loss_fn
    x0 = torch.from_numpy(np.random.default_rng(0).integers(0, mask_id, (args.batch_size, args.seq_len)))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(x0).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def worker(name: str, vocab_size: int, args: argparse.Namespace, conn: Any) -> None:
    """A row's process: builds its step, reports (first step seconds, parameters), then runs as many timed steps as
    it is sent until it is sent None."""
    if name.startswith("jax"):
        step, jax_vocab, count = jax_step("float32" if name.endswith("f32") else "bfloat16", args)
        assert jax_vocab == vocab_size, (jax_vocab, vocab_size)
    else:
        import torch

        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        step, count = torch_step("compiled" in name, name.endswith("bf16"), vocab_size, args)
    start = time.perf_counter()
    step()  # compile / warm up
    conn.send((time.perf_counter() - start, count))
    while (n := conn.recv()) is not None:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        conn.send(times)


def run_group(names: list[str], vocab_size: int, args: argparse.Namespace, first: dict, params: dict,
              times: dict) -> None:
    """Starts one process per row (each idle while another runs: no thread pools contend), then runs --rounds
    rounds of --steps_per_round steps per row in alternation; fills first-step seconds, parameter counts and step
    times. Only one dtype's rows are alive at a time: with all six processes alive the dlm-jax float32 step ran
    20-30% slower than with its own dtype's three (docs/benchmarks.md), for a reason not found."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in names:
        ours, theirs = context.Pipe()
        process = context.Process(target=worker, args=(name, vocab_size, args, theirs), daemon=True)
        process.start()
        workers[name] = (process, ours)
        first[name], params[name] = ours.recv()
        times[name] = []
        print(f"  {name}: {params[name]:,} parameters, first step {first[name]:.1f} s", flush=True)
    for r in range(args.rounds):
        for name, (_, conn) in workers.items():
            conn.send(args.steps_per_round)
            times[name] += conn.recv()
        print(f"  {'/'.join(names)}: round {r + 1}/{args.rounds} done", flush=True)
    for process, conn in workers.values():
        conn.send(None)
        process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, default in (("layers", 6), ("d_model", 512), ("heads", 8), ("mlp_dim", 2048), ("seq_len", 256),
                         ("batch_size", 16), ("rounds", 5), ("steps_per_round", 3), ("matmul_n", 2048)):
        parser.add_argument(f"--{key}", type=int, default=default)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--jax_layers", default="unrolled", choices=("unrolled", "scan"))
    parser.add_argument("--output", default="bench_out/vs_pytorch.json")
    parser.add_argument("--malloc", default="default", choices=("default", "hugetlb"),
                        help="hugetlb: every row (dlm-jax and PyTorch alike) with GLIBC_TUNABLES="
                             "glibc.malloc.hugetlb=1, as `dlm-jax` runs itself; default: glibc's own")
    args = parser.parse_args()
    if args.malloc == "hugetlb":
        relaunch_with_huge_pages()  # the row processes inherit it
    names = [r for r in args.rows.split(",") if r]
    if set(names) - set(ROWS):
        parser.error(f"--rows: unknown {sorted(set(names) - set(ROWS))}; choose from {', '.join(ROWS)}")
    have_torch = importlib.util.find_spec("torch") is not None
    if not have_torch:
        print("PyTorch is not installed: its rows are skipped (pip install -e '.[bench]', CPU wheel: see "
              "docs/benchmarks.md)")
        names = [r for r in names if r.startswith("jax")]
    torch_version = importlib.metadata.version("torch") if have_torch else None
    flags = cpu_flags()
    print(f"{cpu_model()} ({os.cpu_count()} cores; {', '.join(k for k, v in flags.items() if v) or 'no AVX flags'}), "
          f"jax {jax.__version__}, torch {torch_version or '-'}; model {args.layers}x{args.d_model} "
          f"({args.heads} heads, swiglu {args.mlp_dim}, rmsnorm, rotary), seq {args.seq_len}, "
          f"batch {args.batch_size}", flush=True)

    vocab_size = tokenizers.ByteTokenizer().vocab_size + 1  # + [MASK]
    # a finished OpenMP region's threads spin-wait by default, stealing the cores of the row that runs next
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    first, params, times = {}, {}, {}
    for dtype in ("f32", "bf16"):  # the rows of one dtype alternate; the dtypes run one after the other
        group = [name for name in names if name.endswith(dtype)]
        if group:
            run_group(group, vocab_size, args, first, params, times)
    if len(set(params.values())) > 1:
        print("WARNING: the models differ in size; the comparison is not like for like")

    tokens = args.batch_size * args.seq_len
    rows = {name: {"step_seconds": float(np.median(t)), "tokens_per_second": tokens / float(np.median(t)),
                   "first_step_seconds": first[name], "steps": len(t)} for name, t in times.items()}
    matmul = {f"jax_{d}": jax_matmul_tflops(args.matmul_n, d) for d in ("float32", "bfloat16")}
    if have_torch:
        matmul.update({f"torch_{d}": torch_matmul_tflops(args.matmul_n, d) for d in ("float32", "bfloat16")})
    pairs = {"f32_vs_eager": ("jax_f32", "torch_eager_f32"), "f32_vs_compiled": ("jax_f32", "torch_compiled_f32"),
             "bf16_vs_eager_autocast": ("jax_bf16", "torch_eager_bf16"),
             "bf16_vs_compiled_autocast": ("jax_bf16", "torch_compiled_bf16"),
             "jax_bf16_vs_f32": ("jax_bf16", "jax_f32")}
    ratios = {key: rows[a]["tokens_per_second"] / rows[b]["tokens_per_second"] for key, (a, b) in pairs.items()
              if a in rows and b in rows}

    print(f"{'row':20s} {'step s':>8s} {'tokens/s':>9s} {'1st step s':>10s}")
    for name, row in rows.items():
        print(f"{name:20s} {row['step_seconds']:8.3f} {row['tokens_per_second']:9.0f} "
              f"{row['first_step_seconds']:10.1f}")
    print(f"{args.matmul_n}^3 matmul TFLOP/s: " + ", ".join(f"{k} {v:.3f}" for k, v in matmul.items()))
    for key, (a, b) in pairs.items():
        if key in ratios:
            print(f"tokens/s {a} / {b}: {ratios[key]:.3f}")
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    write_result({"benchmark": "vs_pytorch", "date": date, "cpu": cpu_model(), "cores": os.cpu_count(),
                  "cpu_flags": flags, "jax": jax.__version__, "torch": torch_version, "config": vars(args),
                  "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "parameters": params,
                  "rows": rows, "matmul_tflops": matmul, "ratios": ratios}, args.output)


if __name__ == "__main__":
    main()
