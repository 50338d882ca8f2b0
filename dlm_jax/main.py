"""The `dlm-jax` command line: train, eval, sample, prepare, compile.

  dlm-jax train   --config=configs/quickstart.py --workdir=DIR [--config.key=value ...]
  dlm-jax eval    --workdir=DIR [--config.key=value ...]
  dlm-jax sample  --workdir=DIR [--sampler=NAME] [--sampler.key=value ...] [--num_samples=N] [--steps=T]
                  [--length=L] [--seed=S] [--config.key=value ...]   (--sampler=NAME --help: its options)
  dlm-jax prepare --config=configs/x.py --output_dir=DIR [--config.key=value ...]
  dlm-jax compile --config=configs/x.py --mesh=data=2,fsdp=4 [--config.key=value ...]

Bad input (config, data, workdir) ends with one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from dlm_jax import config as config_lib
from dlm_jax import fileio
from dlm_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm-jax", description="Diffusion language models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a model in --workdir")
    p.add_argument("--config", required=True, help="python config file with get_config()")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events")
    _add_distributed_args(p)
    p = sub.add_parser("eval", help="NELBO / NLL, ppl and bits on the val split, or --gen: a sampler sweep")
    p.add_argument("--workdir", required=True)
    p.add_argument("--gen", action="store_true", help="sweep samplers x steps: Gen PPL, entropy, NFE, wall time")
    p.add_argument("--samplers", default=None, help="--gen: comma-separated sampler names (default: all)")
    p.add_argument("--steps_list", default="16,64,256", help="--gen: comma-separated step counts")
    p.add_argument("--output_dir", default=None, help="--gen: where gen_sweep.{json,csv,png} go (default: WORKDIR)")
    _add_sampling_args(p)
    _add_distributed_args(p)
    p = sub.add_parser("sample", help="draw samples from the latest checkpoint (last line: JSON)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--sampler", default=None, help="sampler name (default: the family's first)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoiser forwards T, the final argmax pass included (README: step convention; not AR)")
    p.add_argument("--output", default=None, help="JSONL file of the samples (default: WORKDIR/samples/...)")
    _add_sampling_args(p)
    p = sub.add_parser("compile", help="lower + compile the train step for a mesh on fake CPU devices; memory")
    p.add_argument("--config", required=True)
    p.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=2,fsdp=4 (tensor defaults to 1)")
    p = sub.add_parser("prepare", help="tokenize + pack a corpus into array_record shards")
    p.add_argument("--config", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_shards", type=int, default=4)
    return parser


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator_address", default=None, help="multi-process: HOST:PORT of process 0")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num_samples", type=int, default=None)
    p.add_argument("--length", type=int, default=None, help="tokens per sample, prompt included (default: seq_len)")
    p.add_argument("--batch_size", type=int, default=None, help="samples per jitted call (default: num_samples)")
    p.add_argument("--prompt", default=None, help="text kept as the prefix of every sample")
    p.add_argument("--infill", default=None, help="text with [MASK] / [MASK*N] spans to fill (diffusion models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
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


def sampler_options(family, sampler: str, values: dict[str, str], strict: bool = True):
    """The typed options of `sampler` from --sampler.k=v values; strict: every key must be one of its options
    (a sweep passes strict=False and gives each sampler the keys it has)."""
    from dlm_jax.sampling.loop import make_options

    options_cls = family.sampler(sampler).options
    if not strict:
        names = {f.name for f in dataclasses.fields(options_cls)}
        values = {k: v for k, v in values.items() if k in names}
    return make_options(sampler, options_cls, values)


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


def _sampling_setup(args, config, sampler: str | None, steps: int, options: dict[str, str]):
    """(experiment, params, step, spec, template, judge) for `sample` and `eval --gen`; validates everything
    before any compile."""
    from dlm_jax.eval.genppl import Judge
    from dlm_jax.experiment import restore_for_inference
    from dlm_jax.sampling.loop import SampleSpec
    from dlm_jax.sampling.prompts import build_template

    num_samples = config.sample.num_samples if args.num_samples is None else args.num_samples
    batch_size = num_samples if args.batch_size is None else args.batch_size
    for name, value in (("--num_samples", num_samples), ("--steps", steps), ("--batch_size", batch_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    temperature = config.sample.temperature if args.temperature is None else args.temperature
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    exp, params, step = restore_for_inference(args.workdir, config)
    length = args.length
    if length is None and args.infill is None:
        length = config.sample.length or config.data.seq_len
    template = build_template(exp.tokenizer, length, args.prompt, args.infill)
    sampler = sampler or exp.family.default_sampler
    spec = SampleSpec(sampler=sampler, num_samples=num_samples, length=len(template), steps=steps,
                      temperature=temperature, top_p=args.top_p,
                      options=sampler_options(exp.family, sampler, options))
    if len(template) > config.data.seq_len and not spec.option("window", 0):
        raise UserError(f"the model was trained on data.seq_len={config.data.seq_len} tokens; cannot sample "
                        f"{len(template)} (lower --length, or slide a context window: --sampler.window=W with "
                        "--sampler=semi_ar or block_nocache)")
    _check_sampler(exp, spec, template, args.judge_workdir)
    judge = Judge(args.judge_workdir) if args.judge_workdir else None
    if judge is not None:
        judge.prepare(np.zeros((1, 1), np.int32), exp.tokenizer, args.retokenize)  # tokenizer clash: fail early
    return exp, params, step, spec, template, judge, batch_size


def _check_sampler(exp, spec, template, judge_workdir: str | None) -> None:
    """Loads the workdirs the sampler's options name (DiffuSpec's verifier), checks the setting, and refuses a judge
    the sampler itself consults (EDLM's energy, DiffuSpec's verifier): it would grade its own choices."""
    from dlm_jax.experiment import load_sampler_components

    load_sampler_components(exp, spec)
    exp.family.check_sample(spec, template)
    if not judge_workdir:
        return
    consulted = {name: f"components.{name}" for name in exp.family.sampling_components}
    consulted.update({name: f"--sampler.{name}" for name, _ in exp.family.sampler(spec.sampler).components})
    for name, key in consulted.items():
        component = exp.family.components.get(name)
        if component and os.path.realpath(component.workdir) == os.path.realpath(judge_workdir):
            raise UserError(f"--judge_workdir={judge_workdir} is {key} of this model, which its sampler runs: it "
                            "would grade its own choices; judge with an independently trained AR workdir")


def cmd_eval(args, config) -> None:
    if args.gen:
        return _cmd_eval_gen(args, config, args.sampler_options)
    if args.sampler_options:
        raise UserError("--sampler.KEY options go with `dlm-jax sample` or `dlm-jax eval --gen`")
    from dlm_jax.eval.likelihood import Evaluator
    from dlm_jax.experiment import restore_for_inference
    from dlm_jax.train import sharding

    exp, params, step = restore_for_inference(args.workdir, config)
    with sharding.mesh_context(exp.mesh):
        evaluator = Evaluator(exp, sharding.batch_sharding(exp.mesh))
        results = evaluator.run(params, step, config.eval.num_batches, extras=True)
    print(json.dumps(results))


def _cmd_eval_gen(args, config, options) -> None:
    from dlm_jax.eval.sweep import run_sweep

    steps_list = [int(x) for x in args.steps_list.split(",") if x.strip()]
    exp, params, step, spec, template, judge, batch_size = _sampling_setup(args, config, None, min(steps_list), {})
    samplers = args.samplers.split(",") if args.samplers else [  # by default, those that run no other workdir or
        name for name, entry in exp.family.samplers.items()    # whose workdir option is given
        if all(options.get(option) for option, _ in entry.components)]
    specs = []
    for name in samplers:  # every setting is checked before the first (slow) one runs
        opts = sampler_options(exp.family, name, options, strict=False)
        for steps in steps_list:
            specs.append(dataclasses.replace(spec, sampler=name, steps=steps, options=opts))
            _check_sampler(exp, specs[-1], template, args.judge_workdir)
    used = {f.name for s in specs for f in dataclasses.fields(s.options)}
    if set(options) - used:
        raise UserError(f"no sampler of --samplers={','.join(samplers)} has option(s) "
                        f"{', '.join(sorted(set(options) - used))}")
    result = run_sweep(exp, params, specs, template, args.seed, batch_size, judge, args.retokenize,
                       args.output_dir or args.workdir)
    print(json.dumps({"step": step, **result}))


def cmd_sample(args, config) -> None:
    from dlm_jax.eval.sweep import generation_row

    options = args.sampler_options
    steps = config.sample.steps if args.steps is None else args.steps
    if options and args.sampler is None:
        raise UserError("--sampler.KEY options need --sampler=NAME")
    exp, params, step, spec, template, judge, batch_size = _sampling_setup(args, config, args.sampler, steps, options)
    tokens, row = generation_row(exp, params, spec, template, args.seed, batch_size, judge, args.retokenize)
    output = args.output or fileio.join(args.workdir, "samples", f"{spec.sampler}_T{steps}_seed{args.seed}.jsonl")
    lines = []
    for i, ids in enumerate(tokens):
        text = exp.tokenizer.decode(ids)
        print(f"--- sample {i} (step {step}, {spec.sampler}) ---")
        print(text)
        lines.append(json.dumps({"text": text, "tokens": [int(x) for x in ids]}) + "\n")
    fileio.write_text(output, "".join(lines))
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
    """Ahead-of-time check that the train step of `config` lowers and compiles for the mesh, with the memory
    estimate per device; runs on fake CPU devices so sharding mistakes show before a pod is rented."""
    import math

    import jax

    from dlm_jax.experiment import build_experiment
    from dlm_jax.train import sharding
    from dlm_jax.train.loop import make_train_step

    sizes = parse_mesh(args.mesh)
    if jax.device_count() != math.prod(sizes.values()):
        raise UserError(f"--mesh={args.mesh} needs {math.prod(sizes.values())} devices, this process has "
                        f"{jax.device_count()}; run `dlm-jax compile` as its own process")
    config = config_lib.apply_overrides(config, [f"--config.mesh.{k}={v}" for k, v in sizes.items()])
    exp = build_experiment(config)
    batch_sharding = sharding.batch_sharding(exp.mesh)
    shape = (config.train.batch_size, config.data.seq_len)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=batch_sharding),
             "loss_mask": jax.ShapeDtypeStruct(shape, jax.numpy.float32, sharding=batch_sharding)}
    with sharding.mesh_context(exp.mesh):
        compiled = make_train_step(exp, batch_sharding).lower(exp.abstract_state, batch, exp.frozen).compile()
    memory = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    mib = {f.replace("_size_in_bytes", "_mib"): getattr(memory, f, 0) / 2**20 for f in fields} if memory else {}
    total = mib.get("argument_mib", 0) + mib.get("output_mib", 0) - mib.get("alias_mib", 0) + mib.get("temp_mib", 0)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params))
    print(f"compiled the {config.model.family} train step ({params / 1e6:.1f}M params, batch {shape}) for mesh "
          f"{dict(exp.mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices")
    for key, value in mib.items():
        print(f"  {key:>16s}: {value:10.1f} MiB per device")
    print(f"  {'estimate':>16s}: {total:10.1f} MiB per device (arguments + outputs - aliased + temporaries)")
    print(json.dumps({"mesh": dict(exp.mesh.shape), "devices": jax.device_count(), "params": params,
                      "per_device_mib": total, **mib}))


def cmd_prepare(args, config) -> None:
    from dlm_jax.data.prepare import prepare

    print(json.dumps(prepare(config.data, args.output_dir, num_shards=args.num_shards)))


MOVED_TO_SAMPLER_OPTIONS = ("--block_length", "--inner", "--unmask_schedule")  # flags of older versions

COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "prepare": cmd_prepare,
            "compile": cmd_compile}


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _fake_devices_for_compile(argv)
    try:
        if _sampler_help(argv):
            return
        known, overrides, options = _split_overrides(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    args, unknown = _parser().parse_known_args(known)
    try:
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
        args.sampler_options = options
        COMMANDS[args.command](args, _load(args, overrides))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the latest checkpoint is kept", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
