"""The `dlm-jax` command line: train, eval, sample, prepare, compile, import, export, plot.

  dlm-jax train   --config=configs/quickstart.py --workdir=DIR [--config.key=value ...]
  dlm-jax eval    --workdir=DIR [--checkpoint_step=N] [--config.key=value ...]
  dlm-jax sample  --workdir=DIR [--sampler=NAME] [--sampler.key=value ...] [--num_samples=N] [--steps=T]
                  [--length=L] [--seed=S] [--checkpoint_step=N] [--output=FILE] [--config.key=value ...]
                  (--sampler=NAME --help: its options)
  dlm-jax prepare --config=configs/x.py --output_dir=DIR [--config.key=value ...]
  dlm-jax compile --config=configs/x.py --mesh=data=2,fsdp=4 [--config.key=value ...]
  dlm-jax import  --format=hf_gpt2|hf_llada|dlm_jax --source=DIR_OR_HUB_NAME --workdir=OUT [--config.key=value ...]
  dlm-jax export  --workdir=DIR --output=OUT_DIR [--checkpoint_step=N] [--no_ema]
  dlm-jax plot    --workdir=DIR [--output_dir=OUT_DIR]
  dlm-jax --version

Bad input (config, data, workdir) and every other failure end with one `error: ...` line on stderr and exit
code 2; DLM_JAX_DEBUG=1 (or --debug) shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import re
import sys
import textwrap
from typing import Any

from dlm_jax import config as config_lib
from dlm_jax import errors, fileio
from dlm_jax.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a missing or malformed flag) are one `error:` line like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")


def finite_float(text: str) -> float:
    """A float flag: a finite number (nan / inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def version() -> str:
    """The version of the installed `dlm-jax` distribution, else the one in the setup.py beside this package."""
    try:
        return importlib.metadata.version("dlm-jax")
    except importlib.metadata.PackageNotFoundError:
        setup = pathlib.Path(__file__).resolve().parent.parent / "setup.py"
        found = re.search(r'version="([^"]+)"', setup.read_text()) if setup.is_file() else None
        return found.group(1) if found else "unknown"


def _help_end(command: str) -> dict[str, Any]:
    """add_parser arguments that end `dlm-jax COMMAND --help` with the config overrides, and for sample / eval
    every sampler name (of all families)."""
    from dlm_jax import families

    parts = ["Any config key can be overridden with --config.KEY=VALUE, e.g. --config.train.num_steps=500 or "
             "--config.model.d_model=256 (the keys and defaults: dlm_jax/config.py and the family sections)."]
    if command in ("sample", "eval"):
        flag = "--sampler=NAME" if command == "sample" else "--gen --samplers=A,B"
        parts.append(f"Samplers ({flag}; which a model has depends on its family): "
                     f"{', '.join(families.sampler_names())}. `--sampler=NAME --help` lists a sampler's options, "
                     "set with --sampler.KEY=VALUE.")
    return {"epilog": "\n\n".join(textwrap.fill(part, 100) for part in parts),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dlm-jax", description="Diffusion language models in JAX.")
    parser.add_argument("--version", action="version", version=f"dlm-jax {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a model in --workdir", **_help_end("train"))
    p.add_argument("--config", required=True, help="python config file with get_config()")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events")
    _add_distributed_args(p)
    p = sub.add_parser("eval", help="NELBO / NLL, ppl and bits on the val split, or --gen: a sampler sweep",
                       **_help_end("eval"))
    p.add_argument("--workdir", required=True)
    p.add_argument("--gen", action="store_true", help="sweep samplers x steps: Gen PPL, entropy, NFE, wall time")
    p.add_argument("--samplers", default=None, help="--gen: comma-separated sampler names (default: all)")
    p.add_argument("--steps_list", default="16,64,256", help="--gen: comma-separated step counts")
    p.add_argument("--output_dir", default=None, help="--gen: where gen_sweep.{json,csv,png} go (default: WORKDIR)")
    _add_sampling_args(p)
    _add_distributed_args(p)
    p = sub.add_parser("sample", help="draw samples from a checkpoint (the latest by default; last line: JSON)",
                       **_help_end("sample"))
    p.add_argument("--workdir", required=True)
    p.add_argument("--sampler", default=None, help="sampler name (default: the family's first)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoiser forwards T, the final argmax pass included (README: step convention; not AR)")
    p.add_argument("--output", default=None, help="JSONL file of the samples, written batch by batch (default: "
                   "WORKDIR/samples/SAMPLER_TSTEPS_seedSEED.jsonl, -1.jsonl ... if it holds other settings' samples; a "
                   "named file holding them is refused)")
    _add_sampling_args(p)
    p = sub.add_parser("compile", help="lower + compile the train step for a mesh on fake CPU devices; memory",
                       **_help_end("compile"))
    p.add_argument("--config", required=True)
    p.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=2,fsdp=4 (tensor defaults to 1)")
    p = sub.add_parser("prepare", help="tokenize + pack a corpus into array_record shards", **_help_end("prepare"))
    p.add_argument("--config", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_shards", type=int, default=4)
    p = sub.add_parser("import", help="public weights (HF layout: config.json + *.safetensors) -> a new workdir "
                       "(docs/weights.md)", **_help_end("import"))
    p.add_argument("--format", required=True, choices=("hf_gpt2", "hf_llada", "dlm_jax"),
                   help="hf_gpt2 -> an ar workdir; hf_llada (LLaDA / HF LLaMA names) -> mdlm; dlm_jax: an export")
    p.add_argument("--source", required=True, help="a local directory, or a HF hub name (downloaded when online)")
    p.add_argument("--workdir", required=True, help="the workdir to create (must not hold a checkpoint)")
    p = sub.add_parser("export", help="a workdir's params (EMA by default) -> OUT/model.safetensors + config.json")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--checkpoint_step", type=int, default=None)
    p.add_argument("--no_ema", action="store_true", help="the raw params instead of the EMA ones")
    p = sub.add_parser("plot", help="loss / val curves of WORKDIR/metrics.jsonl -> PNG files")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output_dir", default=None, help="where the PNGs go (default: WORKDIR)")
    return parser


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator_address", default=None, help="multi-process: HOST:PORT of process 0")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint_step", type=int, default=None, help="restore this step (default: the latest)")
    p.add_argument("--num_samples", type=int, default=None)
    p.add_argument("--length", type=int, default=None, help="tokens per sample, prompt included (default: seq_len)")
    p.add_argument("--batch_size", type=int, default=None, help="samples per jitted call (default: num_samples)")
    p.add_argument("--prompt", default=None, help="text kept as the prefix of every sample")
    p.add_argument("--infill", default=None, help="text with [MASK] / [MASK*N] spans to fill (diffusion models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=finite_float, default=None)
    p.add_argument("--top_p", type=finite_float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--judge_workdir", default=None, help="an AR workdir that scores the samples (Gen PPL)")
    p.add_argument("--retokenize", action="store_true", help="score with a judge of another tokenizer")


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """(other arguments, --config.k=v overrides, {k: v} of the --sampler.k=v sampler options)."""
    overrides = [a for a in argv if a.startswith("--config.")]
    options = {}
    for a in argv:
        if a.startswith("--sampler."):
            key, sep, value = a[len("--sampler."):].partition("=")
            if not sep or not key:
                raise UserError(f"cannot parse argument {a!r}; sampler options look like --sampler.inner=cached")
            options[key] = value
    rest = [a for a in argv if not a.startswith(("--config.", "--sampler."))]
    return rest, overrides, options


def _load(args: argparse.Namespace, overrides: list[str]):
    from dlm_jax import families

    if getattr(args, "config", None):
        config = families.load_config_file(args.config)
    else:
        from dlm_jax.experiment import load_workdir_config

        config = load_workdir_config(args.workdir)
    config = config_lib.apply_overrides(config, overrides)
    families.validate(config)
    return config


def _sampler_help(argv: list[str]) -> bool:
    """`dlm-jax sample --sampler=NAME --help`: print the sampler's options (of the workdir's family when given)."""
    if not argv or argv[0] not in ("sample", "eval") or not {"--help", "-h"} & set(argv):
        return False
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--sampler=")), None)
    if name is None:
        return False
    from dlm_jax import families
    from dlm_jax.sampling.loop import describe_options

    workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
    if workdir is not None:
        from dlm_jax.experiment import load_workdir_config

        candidates = [load_workdir_config(workdir).model.family]
    else:
        candidates = list(families.FAMILIES)
    found = [(f, families.get(f).samplers[name]) for f in candidates if name in families.get(f).samplers]
    if not found:
        raise UserError(f"no sampler {name!r} in family {', '.join(candidates)}")
    for fam, entry in found:
        print(f"{name} ({fam}): {entry.doc}")
        print(describe_options(name, entry.options))
    return True


def cmd_train(args, config) -> None:
    from dlm_jax.train.loop import train

    metrics = train(config, args.workdir)
    print(json.dumps({"workdir": args.workdir, **metrics}))


def cmd_eval(args, config) -> None:
    if args.gen:
        return _cmd_eval_gen(args, config, args.sampler_options)
    if args.sampler_options:
        raise UserError("--sampler.KEY options go with `dlm-jax sample` or `dlm-jax eval --gen`")
    from dlm_jax.eval.likelihood import Evaluator
    from dlm_jax.experiment import restore_for_inference
    from dlm_jax.train import sharding

    exp, params, step = restore_for_inference(args.workdir, config, step=args.checkpoint_step)
    with sharding.mesh_context(exp.mesh):
        evaluator = Evaluator(exp, sharding.batch_sharding(exp.mesh))
        results = evaluator.run(params, step, config.eval.num_batches, extras=True)
    print(json.dumps(results))


def _cmd_eval_gen(args, config, options) -> None:
    from dlm_jax.eval.sampling_setup import check_sampler, sampler_options, sampling_setup
    from dlm_jax.eval.sweep import run_sweep

    try:
        steps_list = [int(x) for x in args.steps_list.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--steps_list={args.steps_list!r}: give comma-separated step counts like 16,64,256") from None
    if not steps_list:
        raise UserError("--steps_list is empty; give comma-separated step counts like 16,64,256")
    exp, params, step, spec, template, judge, batch_size = sampling_setup(args, config, None, min(steps_list), {})
    samplers = args.samplers.split(",") if args.samplers else [  # by default, those that run no other workdir or
        name for name, entry in exp.family.samplers.items()    # whose workdir option is given
        if all(options.get(option) for option, _ in entry.components)]
    specs = []
    for name in samplers:  # every setting is checked before the first (slow) one runs
        opts = sampler_options(exp.family, name, options, strict=False)
        for steps in steps_list:
            specs.append(dataclasses.replace(spec, sampler=name, steps=steps, options=opts))
            check_sampler(exp, specs[-1], template, args.judge_workdir)
    used = {f.name for s in specs for f in dataclasses.fields(s.options)}
    if set(options) - used:
        raise UserError(f"no sampler of --samplers={','.join(samplers)} has option(s) "
                        f"{', '.join(sorted(set(options) - used))}")
    result = run_sweep(exp, params, specs, template, args.seed, batch_size, judge, args.retokenize,
                       args.output_dir or args.workdir)
    print(json.dumps({"step": step, **result}))


def cmd_sample(args, config) -> None:
    """Samples to stdout and to the JSONL file (eval/sample_output.py), batch by batch; the last line: JSON stats."""
    from dlm_jax import families
    from dlm_jax.eval import sample_output
    from dlm_jax.eval.sampling_setup import sampling_setup
    from dlm_jax.eval.sweep import generation_row

    options = args.sampler_options
    steps = config.sample.steps if args.steps is None else args.steps
    if options and args.sampler is None:
        raise UserError("--sampler.KEY options need --sampler=NAME")
    sampler = args.sampler or next(iter(families.get(config.model.family).samplers), "none")
    output = args.output or fileio.join(args.workdir, "samples", f"{sampler}_T{steps}_seed{args.seed}.jsonl")
    sample_output.check_output_path(output)  # before anything is loaded or compiled
    exp, params, step, spec, template, judge, batch_size = sampling_setup(args, config, args.sampler, steps, options)
    settings = sample_output.sample_settings(spec, exp.family.sampler(spec.sampler).uses_steps, args.prompt,
                                             args.infill, args.seed, step)
    if args.output:  # before the compile: a file the user named is never replaced by samples of other settings
        sample_output.check_existing(output, settings)
    else:  # the default name goes to STEM-N.jsonl when it holds samples of other settings
        output = sample_output.free_default_path(output, settings)
    writer = sample_output.SampleWriter(output, settings, exp.tokenizer, int((template < 0).sum()))
    _, row = generation_row(exp, params, spec, template, args.seed, batch_size, judge, args.retokenize, writer)
    print(json.dumps({**row, "family": exp.family.name, "checkpoint_step": step, "output": output}))


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"--mesh={text!r}: use positive sizes like data=2,fsdp=4,tensor=1")
        sizes[name.strip()] = int(value)
    return sizes


def cmd_compile(args, config) -> None:
    from dlm_jax.train.aot import compile_train_step

    print(json.dumps(compile_train_step(config, args.mesh, parse_mesh(args.mesh))))


def cmd_import(args, config) -> None:
    from dlm_jax.weights import importer

    print(json.dumps(importer.import_weights(args.format, args.source, args.workdir, args.overrides)))


def cmd_export(args, config) -> None:
    from dlm_jax.weights import export

    print(json.dumps(export.export_workdir(args.workdir, config, args.output, args.checkpoint_step, not args.no_ema)))


def cmd_plot(args, config) -> None:
    from dlm_jax.eval import curves

    print(json.dumps(curves.plot_curves(args.workdir, args.output_dir or args.workdir)))


def cmd_prepare(args, config) -> None:
    from dlm_jax.data.prepare import prepare

    print(json.dumps(prepare(config.data, args.output_dir, num_shards=args.num_shards)))


MOVED_TO_SAMPLER_OPTIONS = ("--block_length", "--inner", "--unmask_schedule")  # flags of older versions

COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "prepare": cmd_prepare,
            "compile": cmd_compile, "import": cmd_import, "export": cmd_export, "plot": cmd_plot}
NO_CONFIG = ("import", "plot")  # commands that read no config (import writes one, with the --config.KEY overrides)


def _fake_devices_for_compile(argv: list[str]) -> None:
    """`dlm-jax compile` runs on as many fake CPU devices as its mesh has (set before jax is imported)."""
    mesh = next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), None)
    if not argv or argv[0] != "compile" or mesh is None or "jax" in sys.modules:
        return
    try:
        count = 1
        for size in parse_mesh(mesh).values():
            count *= size
    except UserError:
        return  # reported by the command itself
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"


def _run(argv: list[str]) -> None:
    if _sampler_help(argv):
        return
    known, overrides, options = _split_overrides(argv)
    args, unknown = _parser().parse_known_args(known)
    if options and args.command not in ("sample", "eval"):
        raise UserError(f"--sampler.KEY options go with `dlm-jax sample`, not `dlm-jax {args.command}`")
    moved = [a for a in unknown if a.split("=", 1)[0] in MOVED_TO_SAMPLER_OPTIONS]
    if moved:
        old = moved[0].split("=", 1)[0]
        raise UserError(f"{old} is now a sampler option: {old.replace('--', '--sampler.', 1)}=...")
    if unknown:
        raise UserError(f"unknown argument(s) {' '.join(unknown)}; see dlm-jax {args.command} --help")
    if hasattr(args, "coordinator_address"):
        from dlm_jax.train.distributed import initialize

        initialize(args.coordinator_address, args.num_processes, args.process_id)
    if overrides and args.command == "plot":
        raise UserError(f"--config.KEY overrides do not go with `dlm-jax {args.command}`")
    args.sampler_options, args.overrides = options, overrides
    COMMANDS[args.command](args, None if args.command in NO_CONFIG else _load(args, overrides))


def main(argv: list[str] | None = None) -> None:
    """Runs one command. Whatever goes wrong ends as one `error: ...` line and exit code 2 (errors.one_line says
    what and how to fix it); DLM_JAX_DEBUG=1 or --debug re-raises with the traceback."""
    if argv is None:  # a real command line (not a call from Python): host memory on huge pages
        from dlm_jax.train.distributed import relaunch_with_huge_pages

        relaunch_with_huge_pages()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("DLM_JAX_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _fake_devices_for_compile(argv)
    try:
        _run(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; the latest checkpoint is kept", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 -- the CLI boundary: every failure becomes one line
        if debug:
            raise
        print(f"error: {errors.one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
