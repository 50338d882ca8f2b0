"""`train.init_from`: start a fresh run from another workdir's trained params (e.g. AR -> block diffusion).

The source's eval params (EMA when it kept one) must have the same tree and shapes as the new model's, except along
a `vocab` axis where the new model may have ids appended (a masked family's [MASK]): the source fills the first
rows / columns and the new ones keep their fresh init. Checked with `load` before the new workdir is written; the
state is then built with `create_state`, directly into the train state's shardings, optimizer fresh, step 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from dlm_jax import config as config_lib
from dlm_jax.errors import UserError
from dlm_jax.experiment import SHAPE_KEYS, Experiment, load_workdir_config, on_mesh_of, restore_for_inference
from dlm_jax.train.state import TrainState, create_train_state

Params = Any


@dataclasses.dataclass
class Source:
    """The trained params to start from, checked against the new model."""

    workdir: str
    family: str
    step: int
    params: Params  # eval params of the source, on the new experiment's mesh
    num_copied: int  # scalars copied into the new params
    num_new_ids: int  # vocabulary ids the new model adds (their rows keep the fresh init)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def flat_params(tree: Params) -> dict[str, Any]:
    """{'layer_0/attention/query/kernel': leaf} of a params tree; flax boxes stay leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf for path, leaf in leaves}


def _model_hint(source: ml_collections.ConfigDict, target: ml_collections.ConfigDict) -> str:
    """' (model.d_model: 192 there, 256 here)': the shape-fixing model keys that differ ('' if none)."""
    diffs = [f"{key}: {config_lib.get_value(source, key)!r} there, {config_lib.get_value(target, key)!r} here"
             for key in SHAPE_KEYS if key.startswith("model.") and key != "model.family"
             and config_lib.get_value(source, key) != config_lib.get_value(target, key)]
    return f" ({'; '.join(diffs)})" if diffs else ""


def _vocab_growth(there: tuple[int, ...], here: tuple[int, ...], names: tuple[str | None, ...]) -> int | None:
    """Ids the new leaf adds along its `vocab` axis (0: same shape); None when the shapes differ in another way."""
    if len(there) != len(here):
        return None
    diff = [i for i in range(len(here)) if there[i] != here[i]]
    if not diff:
        return 0
    if len(diff) > 1 or names[diff[0]] != "vocab" or there[diff[0]] > here[diff[0]]:
        return None
    return here[diff[0]] - there[diff[0]]


def check_fits(source: Params, fresh: Params, where: str, hint: str) -> tuple[int, int]:
    """(scalars copied, vocabulary ids added) when `source` (arrays) fits the boxed abstract `fresh` params: the same
    paths and shapes, except one `vocab` axis that may be longer here; else a one-line UserError."""
    src, dst = flat_params(source), flat_params(fresh)
    copied, new_ids = 0, 0
    for path, box in dst.items():
        if path not in src:
            raise UserError(f"{where}: params differ: {path} is here but not there{hint}; train the source with the "
                            "same model.* settings")
        value = box.unbox(apply_constraint=False) if _is_box(box) else box
        names = tuple(box.names) if _is_box(box) else (None,) * len(value.shape)
        there, here = tuple(src[path].shape), tuple(value.shape)
        growth = _vocab_growth(there, here, names)
        if growth is None:
            raise UserError(f"{where}: params differ at {path}: {there} there, {here} here{hint}; use the same "
                            "model.* sizes")
        copied += src[path].size
        new_ids = max(new_ids, growth)
    extra = next((path for path in src if path not in dst), None)
    if extra is not None:
        raise UserError(f"{where}: params differ: {extra} is there but not here{hint}; train the source with the "
                        "same model.* settings")
    return copied, new_ids


def load(exp: Experiment) -> Source:
    """The latest checkpoint of `exp.config.train.init_from`, restored on exp's mesh and checked against exp's
    params; one-line UserErrors (missing / untrained workdir, another tokenizer, another shape)."""
    config = exp.config
    workdir = config.train.init_from
    where = f"train.init_from={workdir!r}"
    try:
        saved = on_mesh_of(load_workdir_config(workdir), config)
        source_exp, params, step = restore_for_inference(workdir, saved, list(exp.mesh.devices.flat))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    there, here = source_exp.tokenizer.describe(), exp.tokenizer.describe()
    if there != here:
        raise UserError(f"{where}: another tokenizer ({there} there, {here} here); use the same data.tokenizer and "
                        "data.tokenizer_path")
    fresh = jax.eval_shape(exp.family.init_params, jax.random.PRNGKey(0))
    copied, new_ids = check_fits(params, fresh, where, _model_hint(saved, config))
    return Source(workdir, saved.model.family, step, params, copied, new_ids)


def copy_into(fresh: Params, source: Params) -> Params:
    """`fresh` (boxed params) with `source`'s values written over it from index 0 of every axis: whole leaves, or
    the first rows / columns of a longer vocab axis (the rest keep their fresh values)."""

    def copy(box: Any, src: jax.Array) -> Any:
        value = box.unbox(apply_constraint=False) if _is_box(box) else box
        # e.g. embedding: src [V, D] into value [V + 1, D]; head kernel: src [D, V] into [D, V + 1]; else equal shapes
        new = jax.lax.dynamic_update_slice(value, src.astype(value.dtype), (0,) * value.ndim)
        return box.replace_boxed(new) if _is_box(box) else new

    return jax.tree.map(copy, fresh, source, is_leaf=_is_box)


def create_state(exp: Experiment, source: Source) -> TrainState:
    """The new run's first state: params (and EMA when kept) = the source's copied into a fresh init, a fresh
    optimizer state, step 0; born in exp's shardings (the source params are jit arguments, not constants)."""

    def init_params(rng: jax.Array, source_params: Params) -> Params:
        return copy_into(exp.family.init_params(rng), source_params)

    state = create_train_state(init_params, exp.optimizer, exp.config, exp.state_shardings, source.params)
    ids = f", {source.num_new_ids} new vocabulary id(s) ([MASK]) at their fresh init" if source.num_new_ids else ""
    print(f"initialised from {source.workdir} ({source.family}, step {source.step}): copied "
          f"{source.num_copied / 1e6:.2f}M params{ids}")
    return state
