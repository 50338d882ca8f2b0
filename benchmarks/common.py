"""Shared by the benchmark scripts: train a recipe once into a workdir (reused on later runs), evaluate it, and
random-weight models for speed-only measurements."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax

from dlm_jax import config as config_lib
from dlm_jax import families
from dlm_jax.eval.likelihood import Evaluator
from dlm_jax.experiment import build_experiment, load_workdir_config, restore_for_inference
from dlm_jax.sampling.loop import SampleSpec
from dlm_jax.train import sharding
from dlm_jax.train.checkpoint import Checkpointer
from dlm_jax.train.loop import train


def ensure_trained(recipe: str, workdir: str, data_path: str, num_steps: int, overrides: tuple[str, ...] = ()) -> bool:
    """Trains `recipe` on `data_path` for `num_steps` into `workdir` unless a checkpoint of that step is there;
    returns whether it trained now."""
    ckpt = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt):
        checkpointer = Checkpointer(workdir, 3)
        done = num_steps in checkpointer.steps()
        checkpointer.close()
        if done:
            return False
    config = families.load_config_file(recipe)
    config = config_lib.apply_overrides(config, [
        f"--config.data.path={data_path}", f"--config.train.num_steps={num_steps}", "--config.train.eval_every=0",
        f"--config.train.checkpoint_every={num_steps}", *overrides])
    print(f"training {recipe} for {num_steps} steps into {workdir}", flush=True)
    train(config, workdir)
    return True


def timed_train(recipe: str, workdir: str, data_path: str, num_steps: int, overrides: tuple[str, ...] = ()) -> float:
    """`ensure_trained`, returning the wall seconds spent training now (0.0 when the checkpoint was there)."""
    start = time.perf_counter()
    trained = ensure_trained(recipe, workdir, data_path, num_steps, overrides)
    return time.perf_counter() - start if trained else 0.0


def evaluate(workdir: str, num_batches: int, extras: bool = False) -> dict:
    """Val NELBO / NLL of the latest checkpoint (the same numbers as `dlm-jax eval`; with `extras` also the family's
    extra eval, as `dlm-jax eval` prints it)."""
    config = load_workdir_config(workdir)
    exp, params, step = restore_for_inference(workdir, config)
    with sharding.mesh_context(exp.mesh):
        return Evaluator(exp, sharding.batch_sharding(exp.mesh)).run(params, step, num_batches, extras=extras)


def random_model(recipe: str, overrides: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """(experiment, random params) of `recipe` + overrides: for speed and token-identity checks only."""
    config = config_lib.apply_overrides(families.load_config_file(recipe), ["--config.data.path=unused",
                                                                              *overrides])
    exp = build_experiment(config)
    with sharding.mesh_context(exp.mesh):
        params = exp.family.init_params(jax.random.PRNGKey(0))
    return exp, nn.meta.unbox(params)


def sample_spec(exp: Any, sampler: str, num_samples: int, length: int, **settings) -> SampleSpec:
    """A SampleSpec for `sampler` of the experiment's family; settings that are options of that sampler (e.g.
    block_length) go into its typed options, the rest (steps, top_p, ...) into the spec; others are dropped."""
    options_cls = exp.family.sampler(sampler).options
    names = {f.name for f in dataclasses.fields(options_cls)}
    options = options_cls(**{k: v for k, v in settings.items() if k in names})
    spec_keys = {f.name for f in dataclasses.fields(SampleSpec)}
    return SampleSpec(sampler, num_samples, length, options=options,
                      **{k: v for k, v in settings.items() if k in spec_keys})


def write_result(result: dict, path: str) -> None:
    """Writes the benchmark's figures to `path` and prints them as the last stdout line (one JSON object)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
