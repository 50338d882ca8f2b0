"""The one train loop every family uses: sharded jit step, EMA, logging, periodic eval, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm
from jax.sharding import Mesh

from dlm_jax import config as config_lib
from dlm_jax import families, fileio
from dlm_jax.data import pipeline, tokenizers
from dlm_jax.errors import UserError
from dlm_jax.eval import likelihood
from dlm_jax.train import checkpoint, optim, sharding
from dlm_jax.train.metrics import MetricsWriter
from dlm_jax.train.state import TrainState, abstract_state_and_shardings, create_train_state, eval_params

# Keys that fix the shapes of the params: a workdir's checkpoint only fits a config that agrees on them.
SHAPE_KEYS = ("model.family", "model.num_layers", "model.d_model", "model.num_heads", "model.mlp_dim",
              "model.mlp_type", "model.norm", "model.time_conditioning", "model.cond_dim", "model.scan_layers",
              "data.tokenizer", "data.tokenizer_path")


@dataclasses.dataclass
class Experiment:
    """Everything built from a config: tokenizer, family, model, mesh, optimizer and state layout."""

    config: ml_collections.ConfigDict
    tokenizer: tokenizers.Tokenizer
    family: families.Family
    model: families.LanguageModel
    mesh: Mesh
    optimizer: optax.GradientTransformation
    abstract_state: TrainState
    state_shardings: TrainState


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    config_lib.validate(config)
    if config.model.attention_impl == "pallas" and jax.default_backend() == "cpu":
        raise UserError("model.attention_impl='pallas' needs a GPU or TPU; use xla or pallas_interpret on CPU")
    tokenizer = tokenizers.get_tokenizer(config.data)
    family, model = families.build(config, tokenizer.vocab_size, tokenizer.eos_id)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_divisibility(config, mesh)
    optimizer = optim.make_optimizer(config.train)
    with sharding.mesh_context(mesh):
        abstract, shardings = abstract_state_and_shardings(model, optimizer, config, mesh)
    return Experiment(config, tokenizer, family, model, mesh, optimizer, abstract, shardings)


def saved_config_path(workdir: str) -> str:
    return fileio.join(workdir, "config.json")


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (WORKDIR/config.json)."""
    path = saved_config_path(workdir)
    if not fileio.as_path(path).is_file():
        raise UserError(f"{workdir!r} has no config.json: is it a dlm-jax workdir? train one with `dlm-jax train`")
    return config_lib.from_json(fileio.read_text(path), where=path)


def restore_for_inference(workdir: str, config: ml_collections.ConfigDict) -> tuple[Experiment, Any, int]:
    """(experiment, eval params (EMA when kept), step) of the latest checkpoint in workdir; no optimizer work."""
    exp = build_experiment(config)
    checkpointer = checkpoint.Checkpointer(workdir, config.train.max_checkpoints)
    with sharding.mesh_context(exp.mesh):
        restored = checkpointer.restore_latest(exp.abstract_state)
    checkpointer.close()
    if restored is None:
        raise UserError(f"no checkpoint in {workdir!r}; train first: dlm-jax train --config=... --workdir={workdir}")
    state, _, step = restored
    return exp, eval_params(state, config.eval.use_ema), step


def check_workdir_matches(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A workdir holding checkpoints of another model shape is an error, not a silent restart."""
    if not fileio.as_path(saved_config_path(workdir)).is_file():
        return
    saved = load_workdir_config(workdir)
    ckpt_dir = fileio.as_path(fileio.join(workdir, "checkpoints"))
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        return
    for key in (*SHAPE_KEYS, "train.ema_decay"):
        old, new = config_lib.get_value(saved, key), config_lib.get_value(config, key)
        if key == "train.ema_decay":  # only whether EMA params exist changes the checkpoint's structure
            old, new = ("on" if old > 0 else "off"), ("on" if new > 0 else "off")
        if old != new:
            raise UserError(
                f"workdir {workdir!r} holds a checkpoint of another model ({key}: {old!r} there, {new!r} now); "
                "use a new --workdir or the same model config"
            )


def make_train_step(exp: Experiment, batch_sharding):
    config, family, model, optimizer = exp.config, exp.family, exp.model, exp.optimizer
    lr_schedule = optim.learning_rate_schedule(config.train)
    ema_decay = config.train.ema_decay

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            terms = family.loss_terms(model, params, batch, rng, config, train=True)
            return terms["nll_sum"] / jnp.maximum(terms["num_tokens"], 1.0), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:  # warmed-up decay min(d, (1 + k) / (10 + k)) so short runs get a usable EMA
            step = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
            ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": lr_schedule(state.step)}
        metrics.update({k: v for k, v in terms.items() if k not in ("nll_sum", "num_tokens")})
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(exp.state_shardings, batch_sharding),
        out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
        donate_argnums=(0,),
    )


def _check_finite(history: list[tuple[int, dict]], checkpointer: checkpoint.Checkpointer) -> None:
    for step, metrics in history:
        bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(metrics[k]))]
        if bad:
            steps = checkpointer.steps()
            kept = f"last good checkpoint step {steps[-1]} kept" if steps else "no checkpoint was written"
            raise UserError(
                f"{bad[0]} is {float(metrics[bad[0]])} at step {step}; stopped ({kept} in {checkpointer.directory}); "
                "lower train.learning_rate or raise train.warmup_steps"
            )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from WORKDIR's latest checkpoint if any) and returns the last logged metrics."""
    exp = build_experiment(config)
    check_workdir_matches(config, workdir)
    train_data = pipeline.make_dataset(
        config.data, exp.tokenizer, "train", config.train.batch_size // jax.process_count(), seed=config.seed,
        shuffle=config.data.shuffle, repeat=True, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_iter = iter(train_data)
    batch_sharding = sharding.batch_sharding(exp.mesh)
    evaluator = likelihood.Evaluator(exp, batch_sharding) if config.train.eval_every > 0 else None
    # inputs are good: only now write to the workdir
    is_main = jax.process_index() == 0
    fileio.as_path(workdir).mkdir(parents=True, exist_ok=True)
    if is_main:
        fileio.write_text(saved_config_path(workdir), config_lib.to_json(config))
    checkpointer = checkpoint.Checkpointer(workdir, config.train.max_checkpoints)
    writer = MetricsWriter(workdir, enabled=is_main)

    with sharding.mesh_context(exp.mesh):
        restored = checkpointer.restore_latest(exp.abstract_state)
        if restored is None:
            state = create_train_state(exp.model, exp.optimizer, config, exp.state_shardings)
            start = 0
        else:
            state, data_state, start = restored
            train_iter.set_state(data_state)
            writer.drop_after(start)
            print(f"resumed from {checkpointer.directory}/{start}")
        train_step = make_train_step(exp, batch_sharding)

        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        tokens_per_step = config.train.batch_size * config.data.seq_len
        print(f"{config.model.family}: {num_params / 1e6:.2f}M params, mesh {dict(exp.mesh.shape)}, "
              f"{tokens_per_step} tokens/step, steps {start} -> {config.train.num_steps}")
        history: list[tuple[int, dict]] = []  # device metrics since the last log (no host sync per step)
        last = {}
        window_start, window_steps = time.perf_counter(), 0
        bar = tqdm.tqdm(total=config.train.num_steps, initial=start, disable=not is_main, dynamic_ncols=True)
        preemption = checkpoint.PreemptionWatcher()
        for step in range(start + 1, config.train.num_steps + 1):
            state, metrics = train_step(state, sharding.global_batch(next(train_iter), batch_sharding))
            history.append((step, metrics))
            window_steps += 1
            if len(history) > 2:  # at most 2 steps in flight: the bar shows finished steps, no per-step host sync
                history[-3][1]["loss"].block_until_ready()
            bar.update(1)
            final = step == config.train.num_steps
            log_step = step % config.train.log_every == 0 or final
            preempted = preemption.reached(step, sync=log_step)
            if log_step:
                history = jax.device_get(history)
                _check_finite(history, checkpointer)
                elapsed = time.perf_counter() - window_start
                last = {k: float(v) for k, v in history[-1][1].items()}
                last["tokens_per_second"] = window_steps * tokens_per_step / elapsed
                writer.write(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_second']:.0f}")
                history, window_start, window_steps = [], time.perf_counter(), 0
            if evaluator is not None and (step % config.train.eval_every == 0 or final):
                results = evaluator.run(eval_params(state, config.eval.use_ema), step, config.eval.num_batches)
                val = {f"val_{k}": v for k, v in results.items() if k not in ("step", "metric")}
                writer.write(step, val)
                last.update(val)
                bar.write(f"step {step}: " + json.dumps({k: round(v, 4) for k, v in val.items()}))
                window_start = time.perf_counter()  # do not count eval time as training throughput
            if step % config.train.checkpoint_every == 0 or final or preempted:
                _check_finite(jax.device_get(history), checkpointer)
                checkpointer.save(step, state, train_iter.get_state())
            if preempted:
                checkpointer.wait()
                bar.write(f"preempted (SIGTERM) at step {step}: checkpoint saved in {checkpointer.directory}; "
                          "run the same command again to resume", file=sys.stderr)
                last["preempted_at_step"] = step
                break
        bar.close()
        preemption.close()
    checkpointer.close()
    writer.close()
    return last
