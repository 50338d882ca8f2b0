"""`dlm-jax compile`: ahead-of-time check that the train step of a config lowers and compiles for a mesh, with
the memory estimate per device; run on fake CPU devices, so sharding mistakes show before a pod is rented."""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from dlm_jax import config as config_lib
from dlm_jax.errors import UserError
from dlm_jax.experiment import build_experiment
from dlm_jax.train import sharding
from dlm_jax.train.loop import make_train_step


def compile_train_step(config: ml_collections.ConfigDict, mesh_text: str, sizes: dict[str, int]) -> dict[str, Any]:
    """Compiles the train step of `config` on the mesh `sizes` (given as `mesh_text` on the command line); prints
    the memory analysis per device and returns it."""
    if jax.device_count() != math.prod(sizes.values()):
        raise UserError(f"--mesh={mesh_text} needs {math.prod(sizes.values())} devices, this process has "
                        f"{jax.device_count()}; run `dlm-jax compile` as its own process")
    config = config_lib.apply_overrides(config, [f"--config.mesh.{k}={v}" for k, v in sizes.items()])
    exp = build_experiment(config)
    batch_sharding = sharding.batch_sharding(exp.mesh)
    shape = (config.train.batch_size, config.data.seq_len)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=batch_sharding),
             "loss_mask": jax.ShapeDtypeStruct(shape, jax.numpy.float32, sharding=batch_sharding)}
    with sharding.mesh_context(exp.mesh):
        compiled = make_train_step(exp, batch_sharding).lower(exp.abstract_state, batch, exp.frozen).compile()
    memory = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    mib = {f.replace("_size_in_bytes", "_mib"): getattr(memory, f, 0) / 2**20 for f in fields} if memory else {}
    total = mib.get("argument_mib", 0) + mib.get("output_mib", 0) - mib.get("alias_mib", 0) + mib.get("temp_mib", 0)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params))
    print(f"compiled the {config.model.family} train step ({params / 1e6:.1f}M params, batch {shape}) for mesh "
          f"{dict(exp.mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices")
    for key, value in mib.items():
        print(f"  {key:>16s}: {value:10.1f} MiB per device")
    print(f"  {'estimate':>16s}: {total:10.1f} MiB per device (arguments + outputs - aliased + temporaries)")
    return {"mesh": dict(exp.mesh.shape), "devices": jax.device_count(), "params": params, "per_device_mib": total,
            **mib}
