"""Train-step throughput and MFU of MDLM and AR on one backbone, per attention implementation.

Defaults follow the backend (explicit flags override them):
  GPU / TPU  the 12 x 768 "small" model of configs/mdlm_owt.py (12 heads, MLP 3072, gelu + layernorm), seq 1024,
             batch 32, bfloat16, vocab 50258 (GPT-2 + [MASK]), attention impls cudnn (what auto picks there on a GPU)
             and pallas, 10 timed steps (xla attention keeps [B, H, L, L] scores per layer: out of memory on an
             80 GB H100 at this batch without remat).
  CPU        a tiny 2 x 128 model, seq 128, batch 4, float32, the byte tokenizer, attention xla, 3 timed steps.
Time conditioning and dropout are off, EMA is off, remat is --remat (default none); nn.scan over layers unless
--layers_modes says otherwise. The batch is random tokens: this measures speed only.

--vocab_size V gives every model exactly V ids (the embedding and output layer of a GPT-2-sized vocabulary)
without loading a tokenizer: `synthetic_tokenizer` swaps an ids-only tokenizer into build_experiment. 0 keeps the
byte tokenizer.

Timing: 2 warm-up steps (the first compiles), then the median of --steps steps, each ended by
jax.block_until_ready. MFU = model FLOPs/s (`flops_per_token`: 3x the forward matmul FLOPs, attention included)
/ peak, where the peak is measured in the same run (best of several large matmuls in the model's dtype, before and
after the rows); on an H100 the MFU against its nominal dense bf16 peak (989 TFLOP/s, SXM) is reported too.

A row that fails (an attention impl this backend cannot run, out of memory) records its error and the script goes
on. Prints a table, then one JSON object as the last stdout line (also written to --output).

  python benchmarks/train_throughput.py [--batch_size 16 --attention_impls cudnn,xla --layers_modes scan,unrolled]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import platform
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from common import write_result

from dlm_jax import families
from dlm_jax.data import tokenizers
from dlm_jax.experiment import build_experiment
from dlm_jax.families import base_config
from dlm_jax.models.transformer import flops_per_token
from dlm_jax.train import sharding
from dlm_jax.train.distributed import relaunch_with_huge_pages
from dlm_jax.train.loop import make_train_step
from dlm_jax.train.state import create_train_state

# Flag defaults per backend: "accelerator" (GPU / TPU) or "cpu".
DEFAULTS = {
    "accelerator": {"layers": 12, "d_model": 768, "heads": 12, "mlp_dim": 3072, "seq_len": 1024, "batch_size": 32,
                    "dtype": "bfloat16", "vocab_size": 50258, "attention_impls": "cudnn,pallas", "steps": 10,
                    "peak_n": 8192, "peak_repeats": 10},
    "cpu": {"layers": 2, "d_model": 128, "heads": 4, "mlp_dim": 512, "seq_len": 128, "batch_size": 4,
            "dtype": "float32", "vocab_size": 0, "attention_impls": "xla", "steps": 3, "peak_n": 2048,
            "peak_repeats": 3},
}
WARMUP_STEPS = 2
H100_NOMINAL_BF16_FLOPS = 989e12  # H100 SXM dense bf16 (no sparsity), NVIDIA's datasheet figure
SHORT_CALL_SECONDS = 1e-2  # a peak matmul shorter than this is timed in loops of SHORT_CALL_LOOP calls
SHORT_CALL_LOOP = 10
ERROR_CHARS = 300


class SyntheticTokenizer(tokenizers.Tokenizer):
    """An ids-only tokenizer of `vocab_size` ids (EOS and PAD the last two) for speed-only runs: no text."""

    name = "synthetic"

    def __init__(self, vocab_size: int):
        if vocab_size < 3:
            raise ValueError(f"--vocab_size must be 0 (byte tokenizer) or >= 3, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_id = vocab_size - 2
        self.pad_id = vocab_size - 1


@contextlib.contextmanager
def synthetic_tokenizer(tokenizer: tokenizers.Tokenizer | None) -> Iterator[None]:
    """While active, `tokenizers.get_tokenizer` (which build_experiment calls with config.data) returns `tokenizer`;
    None leaves it alone. Restored on exit, also when building fails."""
    if tokenizer is None:
        yield
        return
    original = tokenizers.get_tokenizer
    tokenizers.get_tokenizer = lambda data: tokenizer
    try:
        yield
    finally:
        tokenizers.get_tokenizer = original


def peak_flops(n: int, dtype: str, repeats: int) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul in `dtype` (the machine's practical peak for that dtype); a short
    matmul is timed as a loop of back-to-back calls per sample."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x: x @ x).lower(a).compile()
    jax.block_until_ready(matmul(a))
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    loop = SHORT_CALL_LOOP if time.perf_counter() - start < SHORT_CALL_SECONDS else 1
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loop):
            out = matmul(a)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / loop)
    return 2 * n**3 / best


def make_config(family: str, attention_impl: str, scan_layers: bool, args: argparse.Namespace):
    """The config of one row: the backbone of the flags, EMA off, all devices on the data axis."""
    c = base_config()
    c.model.family = family
    c.model.num_layers, c.model.d_model, c.model.num_heads = args.layers, args.d_model, args.heads
    c.model.mlp_dim = args.mlp_dim
    c.model.mlp_type = args.mlp_type
    c.model.norm = args.norm
    c.model.time_conditioning = False
    c.model.dropout = args.dropout
    c.model.dtype = args.dtype
    c.model.scan_layers = scan_layers
    c.model.remat = args.remat
    c.model.attention_impl = attention_impl
    c.data.seq_len = args.seq_len
    c.train.batch_size = args.batch_size
    c.train.ema_decay = 0.0
    c.mesh.data = -1
    return c


class TrainStep:
    """One row's train step, ready to time: the experiment, its state on the mesh and a fixed random batch;
    `run()` runs one step and waits for it."""

    def __init__(self, family: str, attention_impl: str, scan_layers: bool, args: argparse.Namespace):
        config = make_config(family, attention_impl, scan_layers, args)
        tokenizer = None
        if args.vocab_size:  # the model gets exactly vocab_size ids: the family appends its own ([MASK]) after these
            tokenizer = SyntheticTokenizer(args.vocab_size - getattr(families.get(family), "num_extra_tokens", 0))
        with synthetic_tokenizer(tokenizer):
            self.exp = exp = build_experiment(config)
        batch_sharding = sharding.batch_sharding(exp.mesh)
        rng = np.random.default_rng(0)
        local = {"tokens": rng.integers(0, exp.tokenizer.vocab_size, (args.batch_size, args.seq_len)).astype(np.int32),
                 "loss_mask": np.ones((args.batch_size, args.seq_len), np.float32)}
        with sharding.mesh_context(exp.mesh):
            self.state = create_train_state(exp.family.init_params, exp.optimizer, config, exp.state_shardings)
            self.step = make_train_step(exp, batch_sharding)
            self.batch = sharding.global_batch(local, batch_sharding)
        self.metrics: dict = {}

    def run(self) -> None:
        with sharding.mesh_context(self.exp.mesh):
            self.state, self.metrics = self.step(self.state, self.batch, self.exp.frozen)
            jax.block_until_ready(self.metrics)


def measure(family: str, attention_impl: str, scan_layers: bool, args: argparse.Namespace) -> dict:
    """Step seconds, tokens/s and model TFLOP/s of one (family, attention impl, layers mode)."""
    step = TrainStep(family, attention_impl, scan_layers, args)
    start = time.perf_counter()
    step.run()  # compiles
    first_step_seconds = time.perf_counter() - start
    for _ in range(WARMUP_STEPS - 1):
        step.run()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - start)
    loss = float(step.metrics["loss"])
    seconds = float(np.median(times))
    tokens_per_second = args.batch_size * args.seq_len / seconds
    cfg = step.exp.family.model.cfg
    model_flops = flops_per_token(cfg, args.seq_len) * tokens_per_second
    del step
    return {"step_seconds": seconds, "first_step_seconds": first_step_seconds, "tokens_per_second": tokens_per_second,
            "model_tflops": model_flops / 1e12, "model_vocab_size": cfg.vocab_size, "loss": loss}


def resolve_defaults(args: argparse.Namespace, backend: str) -> None:
    """Fills every flag left at None with the backend's default."""
    defaults = dict(DEFAULTS["cpu" if backend == "cpu" else "accelerator"])
    if backend == "tpu":
        defaults["attention_impls"] = "xla,pallas"  # cuDNN is NVIDIA's
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _cell(row: dict, key: str, fmt: str, width: int) -> str:
    return f"{row[key]:{width}{fmt}}" if row.get(key) is not None else f"{'-':>{width}s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key in ("layers", "d_model", "heads", "mlp_dim", "seq_len", "batch_size", "vocab_size", "steps", "peak_n",
                "peak_repeats"):
        parser.add_argument(f"--{key}", type=int, default=None, help="default: by backend (see the module doc)")
    parser.add_argument("--dtype", default=None, help="model compute dtype; default bfloat16 GPU/TPU, float32 CPU")
    parser.add_argument("--attention_impls", default=None, help="comma list; default cudnn,pallas GPU/TPU, xla CPU")
    parser.add_argument("--layers_modes", default="scan", help="comma list of scan / unrolled")
    parser.add_argument("--families", default="mdlm,ar", help="comma list of families")
    parser.add_argument("--mlp_type", default="gelu", help="gelu (configs/mdlm_owt.py) or swiglu")
    parser.add_argument("--norm", default="layernorm", help="layernorm (configs/mdlm_owt.py) or rmsnorm")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--remat", default="none", help="none | full | dots")
    parser.add_argument("--output", default="bench_out/train_throughput.json")
    args = parser.parse_args()
    relaunch_with_huge_pages()  # as `dlm-jax train` runs
    backend = jax.default_backend()
    resolve_defaults(args, backend)
    impls = [x for x in args.attention_impls.split(",") if x]
    layers_modes = [x for x in args.layers_modes.split(",") if x]
    family_names = [x for x in args.families.split(",") if x]
    if set(layers_modes) - {"scan", "unrolled"}:
        parser.error(f"--layers_modes takes scan and/or unrolled, got {args.layers_modes!r}")
    device = jax.devices()[0].device_kind
    print(f"backend {backend} x{jax.device_count()} ({device}), jax {jax.__version__}, model {args.layers}x"
          f"{args.d_model} ({args.heads} heads, mlp {args.mlp_dim} {args.mlp_type}, {args.norm}), seq {args.seq_len}, "
          f"batch {args.batch_size}, {args.dtype}, vocab {args.vocab_size or 'byte'}, remat {args.remat}", flush=True)

    peak_before = peak_flops(args.peak_n, args.dtype, args.peak_repeats)
    rows = []
    for layers in layers_modes:
        for impl in impls:
            for family in family_names:
                row = {"family": family, "attention_impl": impl, "layers": layers}
                print(f"  {family} {impl} {layers}", flush=True)
                try:
                    row.update(measure(family, impl, layers == "scan", args))
                except Exception as e:  # noqa: BLE001 -- recorded in the row; the benchmark goes on
                    row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:ERROR_CHARS]
                rows.append(row)
                gc.collect()
                jax.clear_caches()
    peak = max(peak_before, peak_flops(args.peak_n, args.dtype, args.peak_repeats))  # the machine may be shared
    nominal = H100_NOMINAL_BF16_FLOPS if "H100" in device else None
    for row in rows:
        if "model_tflops" in row:
            row["mfu"] = row["model_tflops"] * 1e12 / peak
            if nominal:
                row["mfu_nominal_h100_bf16"] = row["model_tflops"] * 1e12 / nominal
    measured = [row for row in rows if "mfu" in row]
    best = max((row["mfu"] for row in measured), default=None)
    ratios = {}  # MDLM / AR tokens/s per (layers mode, attention impl)
    by_setting = {(r["family"], r["layers"], r["attention_impl"]): r["tokens_per_second"] for r in measured}
    for (family, layers, impl), tokens_per_second in by_setting.items():
        if family == "mdlm" and ("ar", layers, impl) in by_setting:
            ratios[f"{layers}/{impl}"] = tokens_per_second / by_setting["ar", layers, impl]

    print(f"peak ({args.dtype} matmul, n={args.peak_n}, measured): {peak / 1e12:.3f} TFLOP/s"
          + (f"; nominal H100 SXM dense bf16: {nominal / 1e12:.0f} TFLOP/s" if nominal else ""))
    header = f"{'family':6s} {'attention':>16s} {'layers':>8s} {'step s':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s}"
    print(header + f" {'MFU':>6s}" + (f" {'MFU nom.':>8s}" if nominal else "") + f" {'1st step s':>10s}")
    for r in rows:
        line = f"{r['family']:6s} {r['attention_impl']:>16s} {r['layers']:>8s} "
        if "error" in r:
            print(line + f"ERROR {r['error']}")
            continue
        line += (f"{r['step_seconds']:8.4f} {r['tokens_per_second']:10.0f} {r['model_tflops']:8.3f} "
                 f"{100 * r['mfu']:5.1f}%")
        if nominal:
            line += f" {100 * r['mfu_nominal_h100_bf16']:7.1f}%"
        print(line + f" {_cell(r, 'first_step_seconds', '.1f', 10)}")
    for key, ratio in ratios.items():
        print(f"MDLM / AR tokens/s ({key}): {ratio:.3f}")
    print(f"best MFU: {'-' if best is None else f'{100 * best:.1f}%'} (of the measured {args.dtype} matmul peak)")
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result = {"benchmark": "train_throughput", "date": date,
              "machine": platform.processor() or platform.machine(), "device": device, "backend": backend,
              "devices": jax.device_count(), "jax": jax.__version__, "config": vars(args),
              "peak_tflops": peak / 1e12, "peak_tflops_before": peak_before / 1e12,
              "nominal_peak_tflops": nominal / 1e12 if nominal else None, "rows": rows,
              "mdlm_over_ar_tokens_per_second": ratios, "best_mfu": best,
              "best_mfu_nominal_h100_bf16": max((r["mfu_nominal_h100_bf16"] for r in measured), default=None)
              if nominal else None}
    write_result(result, args.output)


if __name__ == "__main__":
    main()
