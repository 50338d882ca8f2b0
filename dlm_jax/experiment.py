"""Experiment assembly: everything built from a config (tokenizer, family with its frozen components, mesh,
optimizer, train-state layout), the workdir's config.json and checks, and restoring trained models.

The train loop, eval, the CLI, the Gen PPL judge and the benchmarks build through here; nothing here trains.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dlm_jax import config as config_lib
from dlm_jax import families, fileio
from dlm_jax.data import tokenizers
from dlm_jax.errors import UserError
from dlm_jax.families.base import Component, Family
from dlm_jax.sampling.loop import SampleSpec
from dlm_jax.train import checkpoint, optim, sharding
from dlm_jax.train.state import TrainState, abstract_state_and_shardings, eval_params

# Common keys that fix the shapes of the params (plus the family's own `shape_keys`): a workdir's checkpoint
# only fits a config that agrees on them.
SHAPE_KEYS = ("model.family", "model.num_layers", "model.d_model", "model.num_heads", "model.mlp_dim",
              "model.mlp_type", "model.norm", "model.time_conditioning", "model.cond_dim", "model.scan_layers",
              "model.positions", "model.max_positions", "model.use_bias", "data.tokenizer", "data.tokenizer_path")


@dataclasses.dataclass
class Experiment:
    """Everything built from a config: tokenizer, family (with its components), mesh, optimizer, state layout."""

    config: ml_collections.ConfigDict
    tokenizer: tokenizers.Tokenizer
    family: Family
    mesh: Mesh
    optimizer: optax.GradientTransformation
    abstract_state: TrainState
    state_shardings: TrainState

    @property
    def frozen(self) -> dict[str, Any]:
        """The components' params: passed to every jitted function as an argument (never trained or saved)."""
        return self.family.frozen

    def frozen_shardings(self) -> Any:
        return jax.tree.map(lambda x: x.sharding, self.frozen)


def build_experiment(config: ml_collections.ConfigDict, devices: list | None = None) -> Experiment:
    """Validates `config` and builds everything for it (on `devices`, default all); loads frozen components."""
    families.validate(config)
    impl, backend = config.model.attention_impl, jax.default_backend()
    if impl == "pallas" and backend == "cpu":
        raise UserError("model.attention_impl='pallas' needs a GPU or TPU; use xla or pallas_interpret on CPU")
    if impl == "cudnn" and (backend != "gpu" or config.model.dtype != "bfloat16"):
        raise UserError(f"model.attention_impl='cudnn' needs an NVIDIA GPU and model.dtype=bfloat16 (backend "
                        f"{backend}, dtype {config.model.dtype}); use attention_impl=auto")
    tokenizer = tokenizers.get_tokenizer(config.data)
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_divisibility(config, mesh)
    cls = families.get(config.model.family)
    components = {name: load_component(config.components[name].workdir, name, cls.component_families[name], config,
                                       devices)
                  for name in cls.needed_components(config)}
    family = cls(config, tokenizer, components)
    optimizer = optim.make_optimizer(config.train)
    with sharding.mesh_context(mesh):
        abstract, shardings = abstract_state_and_shardings(family.init_params, optimizer, config, mesh)
    return Experiment(config, tokenizer, family, mesh, optimizer, abstract, shardings)


def has_trainable_params(exp: Experiment) -> bool:
    """False for a model made only of frozen components (e.g. EDLM with an AR energy): nothing to train or save."""
    return bool(jax.tree.leaves(exp.abstract_state.params))


def saved_config_path(workdir: str) -> str:
    return fileio.join(workdir, "config.json")


def _missing_keys(text: str, config: ml_collections.ConfigDict) -> list[str]:
    """The keys of `config` (loaded from the config.json `text`) that the file lacks, i.e. that got defaults; keys
    of older versions count under their new names (families.registry.FLAT_MODEL_KEYS), and the sections of the
    other families and their components, which this model never reads, are left out."""
    saved = set(config_lib.flatten(ml_collections.ConfigDict(json.loads(text))))
    family = config.model.family
    saved |= {f"{family}.{key.split('.', 1)[1]}" for key in saved
              if key.split(".", 1)[0] == "model" and key.split(".", 1)[1] in families.registry.FLAT_MODEL_KEYS}
    cls = families.get(family)
    other_sections = set(families.FAMILIES) - {family}
    unused_components = {f"components.{name}." for name in families.base_config().components} - {
        f"components.{name}." for name in cls.component_families}
    return sorted(key for key in config_lib.flatten(config) if key not in saved
                  and key.split(".", 1)[0] not in other_sections
                  and not any(key.startswith(prefix) for prefix in unused_components))


def _read_workdir_config(workdir: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(the config of WORKDIR/config.json, the keys it lacks: see `_missing_keys`)."""
    path = saved_config_path(workdir)
    if not fileio.as_path(path).is_file():
        raise UserError(f"{workdir!r} has no config.json: is it a dlm-jax workdir? train one with `dlm-jax train`")
    text = fileio.read_text(path)
    config = families.config_from_json(text, where=path)
    return config, _missing_keys(text, config)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (WORKDIR/config.json; older layouts are converted on load). Keys the
    file lacks get their defaults, with a one-line warning naming them."""
    config, missing = _read_workdir_config(workdir)
    if missing:
        names = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        print(f"warning: {saved_config_path(workdir)} has no key(s) {names}; using their defaults (fine for keys a "
              "newer dlm-jax added; if the file was edited or truncated, restore it)", file=sys.stderr)
    return config


def statistics_path(workdir: str) -> str:
    return fileio.join(workdir, "statistics.npz")


def load_statistics(workdir: str) -> dict[str, np.ndarray]:
    """The data statistics a family saved in the workdir (families/base.py: statistics_*_training); {} if none."""
    path = statistics_path(workdir)
    if not fileio.as_path(path).is_file():
        return {}
    try:
        with np.load(io.BytesIO(fileio.as_path(path).read_bytes()), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        raise UserError(f"{path} is not a readable statistics file; restore it from a copy, or retrain the "
                        "workdir (it is written at the start and the end of training)") from None


def save_statistics(workdir: str, stats: dict[str, np.ndarray], replace: bool = False) -> None:
    """Adds `stats` to WORKDIR/statistics.npz, or with `replace` makes them its only content (written whole, then
    renamed over the old file; main process only)."""
    if jax.process_index() != 0:
        return
    buffer = io.BytesIO()
    np.savez(buffer, **{**({} if replace else load_statistics(workdir)), **stats})
    fileio.write_bytes(statistics_path(workdir), buffer.getvalue())


def restore_for_inference(workdir: str, config: ml_collections.ConfigDict, devices: list | None = None,
                          step: int | None = None) -> tuple[Experiment, Any, int]:
    """(experiment, eval params (EMA when kept), step) of the checkpoint `step` in workdir (None: the latest); no
    optimizer work. A `step` the workdir has no checkpoint of is a one-line error listing the steps it has."""
    check_workdir_matches(config, workdir)
    exp = build_experiment(config, devices)
    exp.family.use_statistics(load_statistics(workdir), workdir)
    if not has_trainable_params(exp):
        if step is not None:
            raise UserError(f"--checkpoint_step={step}: a {config.model.family} model is made of its frozen "
                            "components and has no checkpoints of its own; leave --checkpoint_step out")
        return exp, exp.family.init_params(jax.random.PRNGKey(0)), 0  # the model is its frozen components
    checkpointer = checkpoint.Checkpointer(workdir, config.train.max_checkpoints)
    try:
        with sharding.mesh_context(exp.mesh):
            if step is None:
                restored = checkpointer.restore_latest(exp.abstract_state)
            else:
                restored = _restore_step(checkpointer, exp.abstract_state, step)
    finally:
        checkpointer.close()
    if restored is None:
        raise UserError(f"no checkpoint in {workdir!r}; train first: dlm-jax train --config=... --workdir={workdir}")
    state, _, step = restored
    return exp, eval_params(state, config.eval.use_ema), step


def _restore_step(checkpointer: checkpoint.Checkpointer, abstract_state: TrainState,
                  step: int) -> tuple[Any, dict, int] | None:
    """(state, data_state, step) of checkpoint `step` (as Checkpointer.restore_latest gives the latest); None when
    there is no checkpoint at all; one-line errors for a step not saved or not readable."""
    steps = checkpointer.steps()
    if not steps:
        return None
    if step not in steps:
        raise UserError(f"--checkpoint_step={step}: no checkpoint of step {step} in {checkpointer.directory}; "
                        f"its steps: {', '.join(map(str, steps))}")
    try:
        restored = checkpointer.restore(step, abstract_state)
    except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint is reported the same way
        why = checkpoint.short_error(e)
        raise UserError(f"--checkpoint_step={step}: the checkpoint in {checkpointer.directory} does not restore "
                        f"({why}); choose another of its steps: {', '.join(map(str, steps))}") from None
    return restored["state"], restored["data"], step


def on_mesh_of(config: ml_collections.ConfigDict, parent: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A loaded workdir's `config` with the mesh axes of the experiment `parent` that uses its model."""
    return config_lib.apply_overrides(config, [f"--config.mesh.{axis}={parent.mesh[axis]}"
                                               for axis in sharding.MESH_AXES])


def load_component(workdir: str, name: str, accepted: tuple[str, ...],
                   parent: ml_collections.ConfigDict | None = None, devices: list | None = None,
                   key: str | None = None) -> Component:
    """The frozen trained model of another workdir (config key components.<name>.workdir, or the setting `key`
    that names it): its family, eval params and config. `parent`: the config of the experiment that uses it (its
    mesh is used for the component too)."""
    key = key or f"components.{name}.workdir"
    try:
        config = load_workdir_config(workdir)
        if config.model.family not in accepted:
            raise UserError(f"it holds a {config.model.family!r} model, this slot takes {' or '.join(accepted)}")
        if parent is not None:
            config = on_mesh_of(config, parent)
        exp, params, _ = restore_for_inference(workdir, config, devices)
    except UserError as e:
        raise UserError(f"{key}={workdir!r}: {e}") from None
    return Component(name, workdir, exp.family, params, config)


def load_sampler_components(exp: Experiment, spec: SampleSpec) -> None:
    """Loads the workdirs the sampler's options name (DiffuSpec's AR verifier, `Sampler.components`) into
    exp.family as components, so their params reach the jitted sampler as arguments (exp.frozen); once per workdir."""
    for name, accepted in exp.family.sampler(spec.sampler).components:
        workdir, loaded = spec.option(name, ""), exp.family.components.get(name)
        if workdir and (loaded is None or loaded.workdir != workdir):
            key = f"--sampler.{name}"
            component = load_component(workdir, name, accepted, exp.config, list(exp.mesh.devices.flat), key)
            exp.family.add_component(component, key)


def check_workdir_matches(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A workdir holding checkpoints of another model shape (or read another way: a family's `reading_keys`) is an
    error, not a silent restart nor a silently wrong eval."""
    if not fileio.as_path(saved_config_path(workdir)).is_file():
        return
    saved, missing = _read_workdir_config(workdir)
    if not checkpoint.has_checkpoint(workdir):
        return
    cls = families.get(config.model.family)
    family_keys = tuple(f"{config.model.family}.{k}" for k in (*cls.shape_keys, *cls.reading_keys))
    for key in (*SHAPE_KEYS, *family_keys, "train.ema_decay"):
        old, new = config_lib.get_value(saved, key), config_lib.get_value(config, key)
        if key == "train.ema_decay":  # only whether EMA params exist changes the checkpoint's structure
            old, new = ("on" if old > 0 else "off"), ("on" if new > 0 else "off")
        if old != new and key in missing:  # a default stands in for the value the checkpoint was trained with
            raise UserError(f"{saved_config_path(workdir)} has no key {key!r} (edited or truncated?); restore it "
                            f"(the checkpoints of {workdir!r} were trained with some value of it, the default "
                            f"{old!r} differs from {new!r} now)")
        if old != new:
            raise UserError(
                f"workdir {workdir!r} holds a checkpoint of another model ({key}: {old!r} there, {new!r} now); "
                "use a new --workdir or the same model config"
            )
