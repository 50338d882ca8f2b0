"""The train state pytree and its sharded initialisation (params born sharded, never on one device first)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from dlm_jax.train import sharding

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    ema_params: Any  # exponential moving average of params (None when train.ema_decay == 0)
    rng: Array  # base PRNG key (uint32[2]); step k uses fold_in(rng, k), so resuming needs no rng bookkeeping


InitParams = Callable[..., Any]  # (rng, *args) -> fresh trainable params (a family's init_params takes only rng)


def _init_fn(init_params: InitParams, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict):
    def init(rng: Array, *args: Any) -> TrainState:
        rng_params, rng_train = jax.random.split(rng)
        params = init_params(rng_params, *args)
        ema = params if config.train.ema_decay > 0 else None
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), ema_params=ema,
            rng=rng_train,
        )

    return init


def abstract_state_and_shardings(
    init_params: InitParams, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """Shapes (jax.ShapeDtypeStruct leaves, unboxed) and NamedShardings of the train state; no FLOPs spent."""
    boxed = jax.eval_shape(jax.jit(_init_fn(init_params, optimizer, config)), jax.random.PRNGKey(0))
    shardings = sharding.logical_shardings(mesh, boxed)
    shapes = jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return abstract, shardings


def create_train_state(
    init_params: InitParams, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict,
    shardings: TrainState, *args: Any,
) -> TrainState:
    """Initialises the state directly into its shardings (jit with out_shardings); `args` (jit arguments, e.g.
    trained params to start from: train/init_from.py) go to `init_params` after its rng."""
    init = _init_fn(init_params, optimizer, config)
    return jax.jit(lambda rng, *a: nn.unbox(init(rng, *a)), out_shardings=shardings)(jax.random.PRNGKey(config.seed),
                                                                                      *args)


def eval_params(state: TrainState, use_ema: bool) -> Any:
    """The params eval and sampling use: the EMA when kept and asked for."""
    return state.ema_params if use_ema and state.ema_params is not None else state.params
