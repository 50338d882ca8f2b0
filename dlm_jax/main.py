"""The `dlm-jax` command line: train, eval, sample, prepare.

  dlm-jax train   --config=configs/quickstart.py --workdir=DIR [--config.key=value ...]
  dlm-jax eval    --workdir=DIR [--config.key=value ...]
  dlm-jax sample  --workdir=DIR [--num_samples=N] [--steps=T] [--length=L] [--seed=S] [--config.key=value ...]
  dlm-jax prepare --config=configs/x.py --output_dir=DIR [--config.key=value ...]

Bad input (config, data, workdir) ends with one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dlm_jax import config as config_lib
from dlm_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm-jax", description="Diffusion language models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a model in --workdir")
    p.add_argument("--config", required=True, help="python config file with get_config()")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events")
    p = sub.add_parser("eval", help="NELBO / NLL, ppl and bits on the val split (last line: JSON)")
    p.add_argument("--workdir", required=True)
    p = sub.add_parser("sample", help="draw samples from the latest checkpoint (last line: JSON)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_samples", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="diffusion steps T (ignored by AR)")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: data.seq_len)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prepare", help="tokenize + pack a corpus into array_record shards")
    p.add_argument("--config", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_shards", type=int, default=4)
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def _load(args: argparse.Namespace, overrides: list[str]):
    if getattr(args, "config", None):
        config = config_lib.load_config_file(args.config)
    else:
        from dlm_jax.train.loop import load_workdir_config

        config = load_workdir_config(args.workdir)
    config = config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    return config


def cmd_train(args, config) -> None:
    from dlm_jax.train.loop import train

    metrics = train(config, args.workdir)
    print(json.dumps({"workdir": args.workdir, **metrics}))


def _restore(workdir: str, config):
    """The experiment of `config` and the latest checkpoint in workdir (no optimizer work done)."""
    from dlm_jax.train import checkpoint, sharding
    from dlm_jax.train.loop import build_experiment

    exp = build_experiment(config)
    checkpointer = checkpoint.Checkpointer(workdir, config.train.max_checkpoints)
    with sharding.mesh_context(exp.mesh):
        restored = checkpointer.restore_latest(exp.abstract_state)
    checkpointer.close()
    if restored is None:
        raise UserError(f"no checkpoint in {workdir!r}; train first: dlm-jax train --config=... --workdir={workdir}")
    state, _, step = restored
    return exp, state, step


def cmd_eval(args, config) -> None:
    from dlm_jax.eval.likelihood import Evaluator
    from dlm_jax.train import sharding

    exp, state, step = _restore(args.workdir, config)
    with sharding.mesh_context(exp.mesh):
        results = Evaluator(exp, sharding.batch_sharding(exp.mesh)).run(state, step, config.eval.num_batches)
    print(json.dumps(results))


def cmd_sample(args, config) -> None:
    import jax

    from dlm_jax.train import sharding
    from dlm_jax.train.state import eval_params

    num_samples = args.num_samples or config.sample.num_samples
    steps = args.steps or config.sample.steps
    length = args.length or config.sample.length or config.data.seq_len
    for name, value in (("--num_samples", num_samples), ("--steps", steps), ("--length", length)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    exp, state, step = _restore(args.workdir, config)
    params = eval_params(state, config.eval.use_ema)
    with sharding.mesh_context(exp.mesh):
        sample = jax.jit(lambda p, rng: exp.family.sample(exp.model, p, rng, config, num_samples, length, steps))
        rng = jax.random.PRNGKey(args.seed)
        jax.block_until_ready(sample(params, rng))  # compile outside the timing
        start = time.perf_counter()
        tokens, stats = jax.block_until_ready(sample(params, rng))
        seconds = time.perf_counter() - start
    tokens = jax.device_get(tokens)
    for i, row in enumerate(tokens):
        print(f"--- sample {i} (step {step}) ---")
        print(exp.tokenizer.decode(row))
    print(json.dumps({
        "sampler": "ancestral" if exp.family.name == "mdlm" else "ar", "family": exp.family.name,
        "steps": steps if exp.family.name != "ar" else length, "nfe": int(stats["nfe"]), "num_samples": num_samples,
        "length": length, "seconds": seconds, "tokens_per_second": num_samples * length / seconds,
    }))


def cmd_prepare(args, config) -> None:
    from dlm_jax.data.prepare import prepare

    print(json.dumps(prepare(config.data, args.output_dir, num_shards=args.num_shards)))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "prepare": cmd_prepare}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    known, overrides = _split_overrides(argv)
    args, unknown = _parser().parse_known_args(known)
    try:
        if unknown:
            raise UserError(f"unknown argument(s) {' '.join(unknown)}; see dlm-jax {args.command} --help")
        COMMANDS[args.command](args, _load(args, overrides))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the latest checkpoint is kept", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
