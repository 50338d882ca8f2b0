"""The one train loop every family uses: sharded jit step, EMA, logging, periodic eval, checkpoints, resume."""

from __future__ import annotations

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

from dlm_jax import config as config_lib
from dlm_jax import fileio
from dlm_jax.data import pipeline
from dlm_jax.errors import UserError
from dlm_jax.eval import likelihood
from dlm_jax.experiment import (
    Experiment,
    build_experiment,
    check_workdir_matches,
    has_trainable_params,
    load_statistics,
    save_statistics,
    saved_config_path,
)
from dlm_jax.train import checkpoint, init_from, optim, sharding, workdir_lock
from dlm_jax.train.metrics import MetricsWriter
from dlm_jax.train.state import TrainState, create_train_state, eval_params


def make_train_step(exp: Experiment, batch_sharding):
    """The jitted step (state, batch, frozen) -> (state, metrics); `frozen` = the components' params (exp.frozen)."""
    config, optimizer = exp.config, exp.optimizer
    lr_schedule = optim.learning_rate_schedule(config.train)
    ema_decay = config.train.ema_decay

    def train_step(state: TrainState, batch: dict[str, jax.Array],
                   frozen: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        family = exp.family.bind(frozen)

        def loss_fn(params):  # the batch also carries the step, for schedules inside a loss (MDLM's mask annealing)
            return family.loss(params, {**batch, "step": state.step}, rng, train=True)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:  # warmed-up decay min(d, (1 + k) / (10 + k)) so short runs get a usable EMA
            step = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
            ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": lr_schedule(state.step)}
        metrics.update(terms)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(exp.state_shardings, batch_sharding, exp.frozen_shardings()),
        out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
        donate_argnums=(0,),
    )


def statistics_batches(exp: Experiment, split: str, batch_sharding):
    """Global eval-size batches of `split`, one pass (train: shuffled), for a family's data statistics; the train
    iterator's stream is untouched."""
    config = exp.config
    data = pipeline.make_dataset(
        config.data, exp.tokenizer, split, config.eval.batch_size // jax.process_count(), seed=config.seed,
        shuffle=split == "train", repeat=False, process_index=jax.process_index(), process_count=jax.process_count(),
    )
    for batch in data:
        yield sharding.global_batch(batch, batch_sharding)


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
    """Trains (resuming from WORKDIR's latest checkpoint if any) and returns the last logged metrics. Process 0
    holds WORKDIR/train.lock meanwhile: a second trainer on the same workdir is refused before it writes anything."""
    with workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0) as lock:
        return _train(config, workdir, lock)


def _progress_line(step: int, num_steps: int, metrics: dict[str, float]) -> str:
    """`step 20/300: loss 3.2100, 1520 tok/s`: the log line printed instead of tqdm's bar when stderr is no
    terminal (CI logs, Slurm, a subprocess)."""
    speed = metrics.get("tokens_per_second")
    return (f"step {step}/{num_steps}: loss {metrics['loss']:.4f}, "
            + (f"{speed:.0f} tok/s" if speed is not None else "first step (compiled), not timed"))


def _train(config: ml_collections.ConfigDict, workdir: str, lock: workdir_lock.WorkdirLock) -> dict[str, Any]:
    """`train` under `lock` (taken here once the workdir exists, if it did not before)."""
    exp = build_experiment(config)
    check_workdir_matches(config, workdir)
    # train.init_from applies to a fresh start only (a checkpoint here already holds the adapted params)
    source = init_from.load(exp) if config.train.init_from and not checkpoint.has_checkpoint(workdir) else None
    is_main = jax.process_index() == 0
    if not has_trainable_params(exp):  # e.g. EDLM with an AR energy: the workdir only records the components
        fileio.as_path(workdir).mkdir(parents=True, exist_ok=True)
        lock.acquire()
        if is_main:
            fileio.write_text(saved_config_path(workdir), config_lib.to_json(config))
        names = ", ".join(f"{k}={v.workdir}" for k, v in exp.family.components.items())
        print(f"{config.model.family}: nothing to train (frozen components {names}); {workdir} is ready for "
              "`dlm-jax sample` and `dlm-jax eval`")
        return {"nothing_to_train": True}
    train_data = pipeline.make_dataset(
        config.data, exp.tokenizer, "train", config.train.batch_size // jax.process_count(), seed=config.seed,
        shuffle=config.data.shuffle, repeat=True, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_iter = iter(train_data)
    batch_sharding = sharding.batch_sharding(exp.mesh)
    evaluator = likelihood.Evaluator(exp, batch_sharding) if config.train.eval_every > 0 else None
    # inputs are good: only now write to the workdir
    fileio.as_path(workdir).mkdir(parents=True, exist_ok=True)
    lock.acquire()
    if is_main:
        fileio.write_text(saved_config_path(workdir), config_lib.to_json(config))
    checkpointer = checkpoint.Checkpointer(
        workdir, config.train.max_checkpoints,
        on_saved=(lambda step: tqdm.tqdm.write(f"checkpoint saved at step {step}")) if is_main else None)
    writer = MetricsWriter(workdir, enabled=is_main)

    with sharding.mesh_context(exp.mesh):
        restored = checkpointer.restore_latest(exp.abstract_state)
        if restored is None and source is not None:
            state, start, source = init_from.create_state(exp, source), 0, None  # drop the source's copy
        elif restored is None:
            state = create_train_state(exp.family.init_params, exp.optimizer, config, exp.state_shardings)
            start = 0
        else:
            state, data_state, start = restored
            train_iter.set_state(data_state)
            print(f"resumed from {checkpointer.directory}/{start}")
        writer.drop_after(start)  # what a crashed run logged after its last checkpoint is logged again
        if restored is None:  # a fresh start: statistics of an earlier run in this workdir no longer apply
            stats = {}
            if exp.family.statistics_before_training is not None:
                stats = exp.family.statistics_before_training(statistics_batches(exp, "train", batch_sharding))
            if stats or load_statistics(workdir):
                save_statistics(workdir, stats, replace=True)
        else:
            stats = load_statistics(workdir)
        exp.family.use_statistics(stats, workdir)
        train_step = make_train_step(exp, batch_sharding)

        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        tokens_per_step = config.train.batch_size * config.data.seq_len
        print(f"{config.model.family}: {num_params / 1e6:.2f}M params, mesh {dict(exp.mesh.shape)}, "
              f"{tokens_per_step} tokens/step, steps {start} -> {config.train.num_steps}")
        if start >= config.train.num_steps:
            print(f"already trained to step {start} (train.num_steps={config.train.num_steps}): nothing to do; "
                  "raise --config.train.num_steps to train further")
        history: list[tuple[int, dict]] = []  # device metrics since the last log (no host sync per step)
        last = {}
        window_start, window_steps = time.perf_counter(), 0  # throughput window: starts after the compiled step
        interactive = is_main and sys.stderr.isatty()  # tqdm's bar on a terminal, plain log lines elsewhere
        bar = tqdm.tqdm(total=config.train.num_steps, initial=start, disable=not interactive, dynamic_ncols=True)
        preemption = checkpoint.PreemptionWatcher()
        for step in range(start + 1, config.train.num_steps + 1):
            state, metrics = train_step(state, sharding.global_batch(next(train_iter), batch_sharding), exp.frozen)
            history.append((step, metrics))
            if step == start + 1:  # the first step compiles: throughput counts from its end
                metrics["loss"].block_until_ready()
                window_start = time.perf_counter()
            else:
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
                last = {k: float(v) for k, v in history[-1][1].items()}
                postfix = {"loss": f"{last['loss']:.4f}"}
                if window_steps:  # none yet when only the compiled step ran
                    last["tokens_per_second"] = window_steps * tokens_per_step / (time.perf_counter() - window_start)
                    postfix["tok_s"] = f"{last['tokens_per_second']:.0f}"
                writer.write(step, last)
                if interactive:
                    bar.set_postfix(postfix)
                elif is_main:
                    bar.write(_progress_line(step, config.train.num_steps, last))
                checkpointer.poll()
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
        if exp.family.statistics_after_training is not None and "preempted_at_step" not in last:
            save_statistics(workdir, exp.family.statistics_after_training(
                eval_params(state, config.eval.use_ema), statistics_batches(exp, "validation", batch_sharding)))
    checkpointer.close()
    writer.close()
    return last
