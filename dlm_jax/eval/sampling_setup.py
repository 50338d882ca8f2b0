"""The sampling setting of `dlm-jax sample` and `dlm-jax eval --gen` from their command-line arguments: the restored
model, the prompt template, the typed sampler options and the Gen PPL judge, every check done before any compile."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import ml_collections
import numpy as np

from dlm_jax.errors import UserError
from dlm_jax.eval.genppl import Judge
from dlm_jax.experiment import Experiment, load_sampler_components, restore_for_inference
from dlm_jax.families.base import Family
from dlm_jax.sampling.loop import SampleSpec, make_options
from dlm_jax.sampling.prompts import build_template


def sampler_options(family: Family, sampler: str, values: dict[str, str], strict: bool = True) -> Any:
    """The typed options of `sampler` from --sampler.k=v values; strict: every key must be one of its options
    (a sweep passes strict=False and gives each sampler the keys it has)."""
    options_cls = family.sampler(sampler).options
    if not strict:
        names = {f.name for f in dataclasses.fields(options_cls)}
        values = {k: v for k, v in values.items() if k in names}
    return make_options(sampler, options_cls, values)


def sampling_setup(args: argparse.Namespace, config: ml_collections.ConfigDict, sampler: str | None, steps: int,
                   options: dict[str, str]) -> tuple[Experiment, Any, int, SampleSpec, np.ndarray, Judge | None, int]:
    """(experiment, params, checkpoint step, spec, template, judge, batch size) for `sample` and `eval --gen`, of
    the checkpoint --checkpoint_step (default: the latest); validates everything before any compile."""
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
    exp, params, step = restore_for_inference(args.workdir, config, step=args.checkpoint_step)
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
    check_sampler(exp, spec, template, args.judge_workdir)
    judge = Judge(args.judge_workdir) if args.judge_workdir else None
    if judge is not None:
        judge.prepare(np.zeros((1, 1), np.int32), exp.tokenizer, args.retokenize)  # tokenizer clash: fail early
    return exp, params, step, spec, template, judge, batch_size


def check_sampler(exp: Experiment, spec: SampleSpec, template: np.ndarray, judge_workdir: str | None) -> None:
    """Loads the workdirs the sampler's options name (DiffuSpec's verifier), checks the setting, and refuses a judge
    the sampler itself consults (EDLM's energy, DiffuSpec's verifier): it would grade its own choices."""
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
