"""Mesh sizing and divisibility errors (sharded == 1-device loss and grads: tests/test_families.py, every family)."""

import ml_collections
import pytest

from dlm_jax.errors import UserError
from dlm_jax.families import base_config
from dlm_jax.train import sharding


def _tiny_config(family: str) -> ml_collections.ConfigDict:
    c = base_config()
    c.model.family = family
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 32, 4, 64
    c.model.time_conditioning = family == "mdlm"
    c.data.seq_len = 16
    c.train.batch_size = 8
    return c


def test_mesh_auto_fill_and_errors():
    mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 1})
    assert sharding.mesh_shape(mesh, 8) == (4, 2, 1)
    with pytest.raises(UserError, match="needs 6 devices but 8"):
        sharding.mesh_shape(ml_collections.ConfigDict({"data": 3, "fsdp": 2, "tensor": 1}), 8)
    with pytest.raises(UserError, match="not a multiple of 3"):
        sharding.mesh_shape(ml_collections.ConfigDict({"data": -1, "fsdp": 3, "tensor": 1}), 8)
    with pytest.raises(UserError, match="at most one -1"):
        sharding.mesh_shape(ml_collections.ConfigDict({"data": -1, "fsdp": -1, "tensor": 1}), 8)


def test_batch_not_divisible_by_mesh_is_a_clear_error():
    config = _tiny_config("mdlm")
    config.train.batch_size = 6
    config.mesh.data, config.mesh.fsdp = 2, 4
    with pytest.raises(UserError, match="train.batch_size=6 is not divisible by mesh.data"):
        sharding.check_divisibility(config, sharding.make_mesh(config.mesh))
