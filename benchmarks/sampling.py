"""Samplers side by side: MDLM (ancestral, cached, first-hitting, top-k confidence, semi-AR) vs AR (KV cache, none).

  1. the shakespeare recipes (MDLM and AR, same backbone, data and steps; trained here when a workdir has no
     checkpoint), then at L = --length: NFE, wall seconds, tokens/s, Gen PPL (judge: the AR model), entropy and
     seconds / AR-with-KV-cache seconds for every sampler x --steps_list
  2. targets, measured in this run:
     a. cached vs ancestral at T = 4L, batch 1: NFE ratio and wall-time ratio >= 3x, identical tokens
     b. AR with KV cache vs without at L = --ar_length (the AR weights at data.seq_len = ar_length), batch 1:
        >= 5x faster, identical tokens
     c. the library's samplers (one jitted lax.scan) vs the same rule driven by a Python loop of jitted single
        steps (ancestral MDLM, AR KV-cache decoding), batch 1, on the trained models and on a tiny random one
        where per-step overhead matters: >= 3x faster
Prints the table, the target lines, then one JSON object as the last stdout line (also written to --output).

  python benchmarks/sampling.py [--train_steps=300] [--steps_list=32,128,512] [--num_samples=8] [--top_p=0.9]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import config as config_lib
from dlm_jax.diffusion.masked import schedule_from_config
from dlm_jax.eval.genppl import Judge
from dlm_jax.eval.speed import timed_sample
from dlm_jax.eval.sweep import generation_row
from dlm_jax.experiment import load_workdir_config, restore_for_inference
from dlm_jax.models.transformer import init_cache
from dlm_jax.sampling.loop import SamplerState, SampleSpec, init_state, sample_categorical
from dlm_jax.sampling.masked import MaskedSampling
from dlm_jax.train import sharding

RECIPES = {"mdlm": "configs/shakespeare_mdlm.py", "ar": "configs/shakespeare_ar.py"}
MDLM_SAMPLERS = ("ancestral", "cached", "first_hitting", "topk_confidence", "semi_ar")
AR_SAMPLERS = ("ar", "ar_nocache")
STEPLESS = ("first_hitting", *AR_SAMPLERS)  # samplers that ignore spec.steps (NFE = tokens generated)


# ------------------------------------------------------------------------------------------------ models


def ensure_trained(family: str, workdir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Trains the shakespeare recipe of `family` into `workdir` unless it already holds that checkpoint."""
    start = time.perf_counter()
    trained = common.ensure_trained(RECIPES[family], workdir, args.data, args.train_steps)
    return {"trained_now": trained, "train_seconds": time.perf_counter() - start if trained else 0.0}


def restore(workdir: str, overrides: tuple[str, ...] = ()) -> tuple[Any, Any, int]:
    """(experiment, eval params, step) of the workdir's latest checkpoint, its saved config + `overrides`."""
    config = config_lib.apply_overrides(load_workdir_config(workdir), list(overrides))
    return restore_for_inference(workdir, config)


def random_model(family: str, length: int, layers: int, d_model: int) -> tuple[Any, Any]:
    """(experiment, random params) of a tiny backbone: speed only (per-step overhead dominates)."""
    return common.random_model(RECIPES[family], (
        f"--config.model.num_layers={layers}", f"--config.model.d_model={d_model}", "--config.model.num_heads=2",
        f"--config.model.mlp_dim={4 * d_model}", f"--config.data.seq_len={length}"))


def num_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


# ------------------------------------------------------------------------------ Python-loop drivers (c)


@dataclasses.dataclass
class LoopDriver:
    """One sampling rule as separately jitted pieces, driven from Python: init(params, rng) -> state, then
    `num_steps` x step(params, state) -> state, then final(params, state) -> state."""

    init: Callable[[Any, jax.Array], SamplerState]
    step: Callable[[Any, SamplerState], SamplerState]
    final: Callable[[Any, SamplerState], SamplerState]
    num_steps: int


def ancestral_driver(exp: Any, spec: SampleSpec, template: np.ndarray) -> LoopDriver:
    """MDLM ancestral (as dlm_jax.sampling.masked.sample: T - 1 reverse steps, then the argmax pass), one jitted
    call per step; the step index is the state's own counter, so no host value crosses per step."""
    model, section = exp.family.model, exp.config.mdlm
    mask_id = exp.family.mask_id
    ms = MaskedSampling(spec, mask_id, schedule_from_config(section), section.t_eps)
    n, length, steps = spec.num_samples, spec.length, spec.steps - 1
    tokens = np.broadcast_to(np.where(template < 0, mask_id, template), (n, length)).astype(np.int32)
    active = jnp.ones((n, length), bool)

    def logits_fn(params):
        return lambda z, t: model.apply({"params": params}, z, t)

    def step(params, st: SamplerState) -> SamplerState:
        t, s = ms.grid(st.step, steps)
        st = ms.ancestral_update(st, ms.predict(logits_fn(params), st.tokens, t), t, s, active)
        return st.replace(nfe=st.nfe + 1)

    return LoopDriver(init=jax.jit(lambda params, rng: init_state(jnp.asarray(tokens), rng)),
                      step=jax.jit(step, donate_argnums=1),
                      final=jax.jit(lambda params, st: ms.final_argmax(logits_fn(params), st), donate_argnums=1),
                      num_steps=steps)


def ar_driver(exp: Any, spec: SampleSpec, template: np.ndarray) -> LoopDriver:
    """AR KV-cache decoding (as dlm_jax.sampling.autoregressive.sample_cached, no prompt): a jitted [BOS] prefill,
    then one jitted single-token decode per new token."""
    if (template >= 0).any():
        raise ValueError("the AR loop driver decodes from [BOS] only (no prompt)")
    model = exp.family.model
    n, length = spec.num_samples, spec.length

    def decode(params, tokens, cache, index):
        return model.apply({"params": params}, tokens, None, cache=cache, cache_index=index)

    def prefill(params, rng) -> SamplerState:
        bos = jnp.full((n, 1), exp.family.bos_id, jnp.int32)
        logits, cache = decode(params, bos, init_cache(model.cfg, n, length), jnp.zeros((), jnp.int32))
        rng, rng_step = jax.random.split(rng)
        first = sample_categorical(rng_step, logits[:, -1], spec.temperature, spec.top_p)
        out = jnp.concatenate([first[:, None], jnp.zeros((n, length - 1), jnp.int32)], axis=1)
        return init_state(out, rng, cache).replace(nfe=jnp.ones((), jnp.int32))

    def step(params, s: SamplerState) -> SamplerState:
        pos = 1 + s.step  # the position being generated; its input token sits at pos - 1
        rng, rng_step = jax.random.split(s.rng)
        last = jax.lax.dynamic_slice_in_dim(s.tokens, pos - 1, 1, axis=1)
        logits, cache = decode(params, last, s.cache, pos)
        token = sample_categorical(rng_step, logits[:, 0], spec.temperature, spec.top_p)
        tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, token[:, None], pos, axis=1)
        return s.replace(tokens=tokens, rng=rng, step=s.step + 1, nfe=s.nfe + 1, cache=cache)

    return LoopDriver(init=jax.jit(prefill), step=jax.jit(step, donate_argnums=1),
                      final=lambda params, st: st, num_steps=length - 1)


def timed_loop(exp: Any, params: Any, driver: LoopDriver, seed: int, num_calls: int) -> tuple[np.ndarray, dict]:
    """Like eval/speed.py:timed_sample (call b uses fold_in(PRNGKey(seed), b); compile outside the clock), but
    each call is driven by the Python loop."""
    base = jax.random.PRNGKey(seed)

    def run(rng: jax.Array) -> SamplerState:
        st = driver.init(params, rng)
        for _ in range(driver.num_steps):
            st = driver.step(params, st)
        return jax.block_until_ready(driver.final(params, st))

    with sharding.mesh_context(exp.mesh):
        # one whole untimed run with a key made as the timed ones are compiles every piece for every input it
        # meets (a raw PRNGKey and a fold_in result, or the states init and step return, can differ in sharding /
        # commitment, and each difference is a compile that would otherwise land inside the clock)
        run(jax.random.fold_in(base, 0))
        outputs, nfes, seconds = [], [], 0.0
        for b in range(num_calls):
            start = time.perf_counter()
            st = run(jax.random.fold_in(base, b))
            seconds += time.perf_counter() - start
            outputs.append(np.asarray(jax.device_get(st.tokens)))
            nfes.append(int(st.nfe))
    return np.concatenate(outputs), {"nfe": float(np.mean(nfes)), "seconds": seconds}


# ---------------------------------------------------------------------------------------------- parts


def table_rows(args: argparse.Namespace, models: dict, judge: Judge, length: int) -> list[dict]:
    """generation_row for every MDLM sampler x steps (first_hitting once) and both AR decoders, one batch size."""
    template = np.full((length,), -1, np.int32)
    settings = []
    for sampler in MDLM_SAMPLERS:
        for steps in ([length] if sampler == "first_hitting" else args.steps_list):
            spec = common.sample_spec(models["mdlm"][0], sampler, args.num_samples, length, steps=steps,
                                      top_p=args.top_p, block_length=args.block_length)
            settings.append(("mdlm", spec))
    settings += [("ar", SampleSpec(s, args.num_samples, length, steps=length, top_p=args.top_p)) for s in AR_SAMPLERS]
    for family, spec in settings:  # every setting is checked before the first (slow) one runs
        exp = models[family][0]
        exp.family.check_sample(dataclasses.replace(spec, num_samples=args.batch_size), template)
    rows = []
    for family, spec in settings:
        exp, params = models[family][:2]
        _, row = generation_row(exp, params, spec, template, args.seed, args.batch_size, judge, False)
        row["family"] = family
        rows.append(row)
        print(f"  {spec.sampler} T={spec.steps}: {row['seconds']:.2f} s, NFE {row['nfe']:.0f}, "
              f"Gen PPL {row['gen_ppl']:.2f}", flush=True)
    ar_seconds = next(r["seconds"] for r in rows if r["sampler"] == "ar")
    for r in rows:
        r["seconds_over_ar_cache"] = r["seconds"] / ar_seconds
    return rows


def target(name: str, measured: float | bool, threshold: float | None) -> dict:
    met = bool(measured) if threshold is None else measured >= threshold
    return {"target": name, "measured": measured, "threshold": threshold, "met": bool(met)}


def cache_target(args: argparse.Namespace, exp: Any, params: Any, length: int) -> tuple[dict, list[dict]]:
    """(a) cached vs ancestral at T = 4L, batch 1, `--cache_samples` calls, same seed."""
    steps = 4 * length
    template = np.full((length,), -1, np.int32)
    out, timing = {}, {}
    for sampler in ("ancestral", "cached"):
        spec = SampleSpec(sampler, args.cache_samples, length, steps=steps, top_p=args.top_p)
        out[sampler], timing[sampler] = timed_sample(exp, params, spec, template, args.seed, batch_size=1)
    nfe_ratio = timing["ancestral"]["nfe"] / timing["cached"]["nfe"]
    time_ratio = timing["ancestral"]["seconds"] / timing["cached"]["seconds"]
    identical = bool((out["ancestral"] == out["cached"]).all())
    where = f"L={length}, T=4L={steps}, batch 1, {args.cache_samples} samples"
    detail = {"length": length, "steps": steps, "samples": args.cache_samples, "batch_size": 1,
              "nfe": {k: v["nfe"] for k, v in timing.items()}, "seconds": {k: v["seconds"] for k, v in timing.items()}}
    return detail, [target(f"cached / ancestral NFE >= 3x ({where})", nfe_ratio, 3.0),
                    target(f"cached / ancestral wall time >= 3x ({where})", time_ratio, 3.0),
                    target(f"cached tokens identical to ancestral ({where})", identical, None)]


def kv_target(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """(b) AR with vs without KV cache at L = --ar_length: the AR weights restored at data.seq_len = ar_length."""
    exp, params, _ = restore(args.ar_workdir, (f"--config.data.seq_len={args.ar_length}",))
    template = np.full((args.ar_length,), -1, np.int32)
    out, timing = {}, {}
    for sampler in AR_SAMPLERS:
        spec = SampleSpec(sampler, args.kv_samples, args.ar_length, top_p=args.top_p)
        out[sampler], timing[sampler] = timed_sample(exp, params, spec, template, args.seed, batch_size=1)
    speedup = timing["ar_nocache"]["seconds"] / timing["ar"]["seconds"]
    identical = bool((out["ar"] == out["ar_nocache"]).all())
    where = f"L={args.ar_length}, batch 1, {args.kv_samples} samples"
    detail = {"length": args.ar_length, "samples": args.kv_samples, "batch_size": 1,
              "nfe": {k: v["nfe"] for k, v in timing.items()}, "seconds": {k: v["seconds"] for k, v in timing.items()},
              "first_mismatch": first_mismatch(out["ar"], out["ar_nocache"])}
    return detail, [target(f"AR KV cache >= 5x faster than no cache ({where})", speedup, 5.0),
                    target(f"AR KV cache tokens identical to no cache ({where})", identical, None)]


def first_mismatch(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first position where any row differs (None: identical)."""
    cols = np.flatnonzero((a != b).any(axis=0))
    return int(cols[0]) if len(cols) else None


def loop_target(args: argparse.Namespace, models: dict, length: int) -> tuple[list[dict], list[dict]]:
    """(c) scan samplers vs the same rule driven by a Python loop of jitted steps, batch 1."""
    cases = [("trained", "mdlm", *models["mdlm"][:2]), ("trained", "ar", *models["ar"][:2])]
    for family in ("mdlm", "ar"):
        cases.append(("tiny random", family, *random_model(family, length, args.tiny_layers, args.tiny_d_model)))
    template = np.full((length,), -1, np.int32)
    details, targets = [], []
    for model_name, family, exp, params in cases:
        if family == "mdlm":
            spec = SampleSpec("ancestral", 1, length, steps=args.loop_steps, top_p=args.top_p)
            driver = ancestral_driver(exp, spec, template)
        else:
            spec = SampleSpec("ar", 1, length, top_p=args.top_p)
            driver = ar_driver(exp, spec, template)
        scan_tokens, scan = timed_sample(exp, params, dataclasses.replace(spec, num_samples=args.loop_samples),
                                         template, args.seed, batch_size=1)
        loop_tokens, loop = timed_loop(exp, params, driver, args.seed, args.loop_samples)
        cfg = exp.family.model.cfg
        size = f"{cfg.num_layers}x{cfg.d_model}"
        steps = f", T={spec.steps}" if family == "mdlm" else ""
        where = (f"{spec.sampler}, {model_name} {size} ({num_params(params) / 1e6:.2f}M), L={length}{steps}, "
                 f"batch 1, {args.loop_samples} samples")
        identical = bool((scan_tokens == loop_tokens).all())
        details.append({"sampler": spec.sampler, "model": model_name, "size": size, "params": num_params(params),
                        "length": length, "steps": spec.steps if family == "mdlm" else None,
                        "samples": args.loop_samples, "batch_size": 1, "scan_seconds": scan["seconds"],
                        "loop_seconds": loop["seconds"], "scan_nfe": scan["nfe"], "loop_nfe": loop["nfe"],
                        "speedup": loop["seconds"] / scan["seconds"], "identical_tokens": identical,
                        "loop_ms_per_step": 1e3 * loop["seconds"] / (args.loop_samples * loop["nfe"]),
                        "scan_ms_per_step": 1e3 * scan["seconds"] / (args.loop_samples * scan["nfe"])})
        targets.append(target(f"scan >= 3x faster than a Python loop of jitted steps ({where})",
                              loop["seconds"] / scan["seconds"], 3.0))
    return details, targets


# ------------------------------------------------------------------------------------------------ main


def print_table(rows: list[dict], length: int, args: argparse.Namespace) -> None:
    print(f"\nL={length}, {args.num_samples} samples, batch {args.batch_size}, temperature 1, top-p {args.top_p}; "
          "Gen PPL judge = the AR model (it judges its own AR samples); ratio = seconds / AR-with-KV-cache seconds")
    print(f"{'sampler':16s} {'steps':>5s} {'NFE':>6s} {'seconds':>8s} {'tokens/s':>9s} {'GenPPL':>8s} "
          f"{'entropy':>8s} {'ratio':>7s}")
    for r in rows:
        steps = "-" if r["sampler"] in STEPLESS else str(r["steps"])
        print(f"{r['sampler']:16s} {steps:>5s} {r['nfe']:6.0f} {r['seconds']:8.2f} {r['tokens_per_second']:9.0f} "
              f"{r['gen_ppl']:8.2f} {r['entropy_bits']:8.3f} {r['seconds_over_ar_cache']:7.2f}")


def format_target(t: dict) -> str:
    m = t["measured"]
    measured = str(m) if isinstance(m, bool) else f"{m:.2f}x"
    return f"target: {t['target']}: measured {measured} ({'met' if t['met'] else 'NOT met'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mdlm_workdir", default="bench_out/shk_mdlm")
    parser.add_argument("--ar_workdir", default="bench_out/shk_ar", help="also the Gen PPL judge")
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--train_steps", type=int, default=300, help="only used when a workdir has no checkpoint")
    parser.add_argument("--length", type=int, default=None, help="table length (default: the recipe's seq_len)")
    parser.add_argument("--steps_list", default="32,128,512", help="comma-separated diffusion step counts")
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_length", type=int, default=16, help="semi_ar block")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus mass (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_samples", type=int, default=4, help="(a) samples, one per call, at T = 4L")
    parser.add_argument("--ar_length", type=int, default=512, help="(b) AR length with / without KV cache")
    parser.add_argument("--kv_samples", type=int, default=2, help="(b) samples, one per call")
    parser.add_argument("--loop_steps", type=int, default=128, help="(c) ancestral steps T")
    parser.add_argument("--loop_samples", type=int, default=4, help="(c) samples, one per call")
    parser.add_argument("--tiny_layers", type=int, default=1, help="(c) the tiny random model")
    parser.add_argument("--tiny_d_model", type=int, default=32)
    parser.add_argument("--output", default="bench_out/sampling.json")
    args = parser.parse_args()
    args.steps_list = [int(x) for x in args.steps_list.split(",") if x.strip()]
    wall_start = time.perf_counter()

    training = {f: ensure_trained(f, getattr(args, f"{f}_workdir"), args) for f in RECIPES}
    models = {f: restore(getattr(args, f"{f}_workdir")) for f in RECIPES}
    length = args.length or models["mdlm"][0].config.data.seq_len
    for f, (exp, _, _) in models.items():
        if length > exp.config.data.seq_len:
            parser.error(f"--length={length} is longer than the {f} model's data.seq_len={exp.config.data.seq_len}")
    judge = Judge(args.ar_workdir)
    info = {f: {"workdir": getattr(args, f"{f}_workdir"), "checkpoint_step": step, "params": num_params(params),
                **training[f]} for f, (_, params, step) in models.items()}
    print(f"backend {jax.default_backend()} x{jax.device_count()}, {platform.processor() or platform.machine()} "
          f"x{os.cpu_count()}, jax {jax.__version__}")
    print(", ".join(f"{f}: {i['workdir']} step {i['checkpoint_step']} ({i['params'] / 1e6:.2f}M params)"
                    for f, i in info.items()), flush=True)

    print("table:", flush=True)
    rows = table_rows(args, models, judge, length)
    print("(a) cached vs ancestral", flush=True)
    cache_detail, targets = cache_target(args, *models["mdlm"][:2], length)
    print("(b) AR KV cache", flush=True)
    kv_detail, kv_targets = kv_target(args)
    print("(c) scan vs Python loop", flush=True)
    loop_details, loop_targets = loop_target(args, models, length)
    targets += kv_targets + loop_targets

    print_table(rows, length, args)
    print()
    for t in targets:
        print(format_target(t))
    wall = time.perf_counter() - wall_start
    print(f"wall time {wall:.0f} s (training {sum(i['train_seconds'] for i in info.values()):.0f} s)")
    result = {"benchmark": "sampling", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": {"processor": platform.processor(), "machine": platform.machine(),
                          "cpu_count": os.cpu_count()},
              "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
              "settings": {**vars(args), "length": length}, "models": info, "rows": rows,
              "cache_vs_ancestral": cache_detail, "kv_cache": kv_detail, "scan_vs_python_loop": loop_details,
              "targets": targets, "all_targets_met": all(t["met"] for t in targets), "wall_seconds": wall}
    common.write_result(result, args.output)


if __name__ == "__main__":
    main()
