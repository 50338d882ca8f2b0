"""Experiment assembly: everything built from a config (tokenizer, family with its frozen components, mesh,
optimizer, train-state layout), the workdir's config.json and checks, and restoring trained models.

The train loop, eval, the CLI, the Gen PPL judge and the benchmarks build through here; nothing here trains.
"""

from __future__ import annotations

import dataclasses
import io
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
              "data.tokenizer", "data.tokenizer_path")


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


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (WORKDIR/config.json; older layouts are converted on load)."""
    path = saved_config_path(workdir)
    if not fileio.as_path(path).is_file():
        raise UserError(f"{workdir!r} has no config.json: is it a dlm-jax workdir? train one with `dlm-jax train`")
    return families.config_from_json(fileio.read_text(path), where=path)


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


def restore_for_inference(workdir: str, config: ml_collections.ConfigDict,
                          devices: list | None = None) -> tuple[Experiment, Any, int]:
    """(experiment, eval params (EMA when kept), step) of the latest checkpoint in workdir; no optimizer work."""
    check_workdir_matches(config, workdir)
    exp = build_experiment(config, devices)
    exp.family.use_statistics(load_statistics(workdir), workdir)
    if not has_trainable_params(exp):
        return exp, exp.family.init_params(jax.random.PRNGKey(0)), 0  # the model is its frozen components
    checkpointer = checkpoint.Checkpointer(workdir, config.train.max_checkpoints)
    with sharding.mesh_context(exp.mesh):
        restored = checkpointer.restore_latest(exp.abstract_state)
    checkpointer.close()
    if restored is None:
        raise UserError(f"no checkpoint in {workdir!r}; train first: dlm-jax train --config=... --workdir={workdir}")
    state, _, step = restored
    return exp, eval_params(state, config.eval.use_ema), step


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
    saved = load_workdir_config(workdir)
    if not checkpoint.has_checkpoint(workdir):
        return
    cls = families.get(config.model.family)
    family_keys = tuple(f"{config.model.family}.{k}" for k in (*cls.shape_keys, *cls.reading_keys))
    for key in (*SHAPE_KEYS, *family_keys, "train.ema_decay"):
        old, new = config_lib.get_value(saved, key), config_lib.get_value(config, key)
        if key == "train.ema_decay":  # only whether EMA params exist changes the checkpoint's structure
            old, new = ("on" if old > 0 else "off"), ("on" if new > 0 else "off")
        if old != new:
            raise UserError(
                f"workdir {workdir!r} holds a checkpoint of another model ({key}: {old!r} there, {new!r} now); "
                "use a new --workdir or the same model config"
            )
