"""The same loss and grads on 1 device and on 8 fake devices (data=2 x fsdp=4), and mesh sizing errors."""

import jax
import ml_collections
import numpy as np
import pytest

from dlm_jax import families
from dlm_jax.errors import UserError
from dlm_jax.families import base_config
from dlm_jax.train import optim, sharding
from dlm_jax.train.state import abstract_state_and_shardings, create_train_state


def _tiny_config(family: str) -> ml_collections.ConfigDict:
    c = base_config()
    c.model.family = family
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 32, 4, 64
    c.model.time_conditioning = family == "mdlm"
    c.data.seq_len = 16
    c.train.batch_size = 8
    return c


def _loss_and_grads(config, devices):
    family, model = families.build(config, vocab_size=258, bos_id=256)
    mesh = sharding.make_mesh(config.mesh, devices)
    optimizer = optim.make_optimizer(config.train)
    with sharding.mesh_context(mesh):
        _, shardings = abstract_state_and_shardings(model, optimizer, config, mesh)
        state = create_train_state(model, optimizer, config, shardings)
        rng = np.random.default_rng(0)
        batch = {"tokens": rng.integers(0, 258, (8, 16)).astype(np.int32), "loss_mask": np.ones((8, 16), np.float32)}
        batch = sharding.global_batch(batch, sharding.batch_sharding(mesh))

        def loss(params):
            terms = family.loss_terms(model, params, batch, jax.random.PRNGKey(1), config, train=True)
            return terms["nll_sum"] / terms["num_tokens"]

        fn = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings.params,))
        value, grads = fn(state.params)
    return state.params, jax.device_get(value), jax.device_get(grads)


@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_sharded_loss_and_grads_match_one_device(family):
    assert jax.device_count() == 8
    config = _tiny_config(family)
    config.mesh.data, config.mesh.fsdp = 1, 1
    _, loss1, grads1 = _loss_and_grads(config, jax.devices()[:1])
    config.mesh.data, config.mesh.fsdp = 2, 4
    params8, loss8, grads8 = _loss_and_grads(config, jax.devices())
    # the params really are split over fsdp
    kernel = params8["layers"]["mlp"]["wo"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.shape[-1] == 32 // 4
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads8, grads1)


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
