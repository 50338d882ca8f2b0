"""Device mesh from `config.mesh` and the one table mapping logical axis names to mesh axes (as MaxText)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dlm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Weights: FSDP shards the embed dim, tensor parallelism the heads / MLP dims. Activations: the batch is
# split over data x fsdp; heads / mlp activations follow the tensor axis (Megatron-style).
LOGICAL_AXIS_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("layers", None),
    ("cond", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Mesh sizes for ('data', 'fsdp', 'tensor'); one -1 is filled with the devices left over."""
    sizes = [mesh_config[a] for a in MESH_AXES]
    desc = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes ({desc}) must be positive with at most one -1 (auto-fill)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise UserError(f"mesh ({desc}) cannot be filled: {num_devices} devices are not a multiple of {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise UserError(
            f"mesh ({desc}) needs {math.prod(sizes)} devices but {num_devices} are available; "
            "set one axis to -1 to auto-fill"
        )
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def check_divisibility(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Shapes the mesh splits must divide evenly; say which key to change when they don't."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    checks = [
        ("train.batch_size", config.train.batch_size, batch_shards, "mesh.data * mesh.fsdp"),
        ("eval.batch_size", config.eval.batch_size, batch_shards, "mesh.data * mesh.fsdp"),
        ("model.d_model", config.model.d_model, mesh.shape["fsdp"], "mesh.fsdp"),
        ("model.num_heads", config.model.num_heads, mesh.shape["tensor"], "mesh.tensor"),
        ("model.mlp_dim", config.model.mlp_dim, mesh.shape["tensor"], "mesh.tensor"),
    ]
    for key, value, shards, what in checks:
        if value % shards:
            raise UserError(f"{key}={value} is not divisible by {what}={shards}; change one of them")
    if config.train.batch_size % jax.process_count():
        raise UserError(f"train.batch_size={config.train.batch_size} is not divisible by {jax.process_count()} hosts")


def logical_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes (others: replicated)."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [B, L] split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's rows into one global array per key (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
    """Makes `mesh` and the logical axis rules current, so activation constraints resolve while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
