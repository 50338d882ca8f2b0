"""`dlm-jax export`: a workdir's params -> OUT/model.safetensors + OUT/config.json (+ its tokenizer file).

Tensor names are the params' paths with dots (`layers.attention.query.kernel`: layers stacked on the leading axis),
float32 as trained; `dlm-jax import --format=dlm_jax --source=OUT` makes a workdir of them again, bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from dlm_jax import config as config_lib
from dlm_jax import fileio
from dlm_jax.errors import UserError
from dlm_jax.experiment import restore_for_inference
from dlm_jax.train.init_from import flat_params
from dlm_jax.weights import safetensors


def export_workdir(workdir: str, config: ml_collections.ConfigDict, output: str, step: int | None = None,
                   use_ema: bool = True) -> dict[str, Any]:
    """Writes the params of checkpoint `step` (None: the latest) of `workdir`, the EMA ones when kept and
    `use_ema`, into the directory `output` (which must not hold a model.safetensors yet)."""
    weights_path = fileio.join(output, "model.safetensors")
    if fileio.as_path(weights_path).exists():
        raise UserError(f"--output={output!r} already holds model.safetensors; export into a new directory")
    config = config_lib.apply_overrides(config, [f"--config.eval.use_ema={use_ema}"])
    _, params, step = restore_for_inference(workdir, config, step=step)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    tensors = {path.replace("/", "."): np.asarray(jax.device_get(leaf)) for path, leaf in flat_params(params).items()}
    if jax.process_index() != 0:
        return {"output": output, "step": step}
    ema = use_ema and config.train.ema_decay > 0
    saved = config
    path = config.data.tokenizer_path
    if config.data.tokenizer in ("hf", "sentencepiece") and path and fileio.as_path(path).is_file():
        name = fileio.as_path(path).name  # a tokenizer file travels with the weights
        fileio.as_path(output).mkdir(parents=True, exist_ok=True)
        fileio.as_path(fileio.join(output, name)).write_bytes(fileio.as_path(path).read_bytes())
        saved = config_lib.apply_overrides(config, [f"--config.data.tokenizer_path={name}"])
    fileio.write_text(fileio.join(output, "config.json"), config_lib.to_json(saved))
    safetensors.write(weights_path, tensors, {"format": "dlm-jax", "family": config.model.family, "step": str(step),
                                              "params": "ema" if ema else "raw"})
    count = sum(t.size for t in tensors.values())
    print(f"exported {workdir} (step {step}, {'EMA' if ema else 'raw'} params, {count / 1e6:.2f}M) to {output}")
    return {"output": output, "step": step, "params": count, "ema": ema, "tensors": len(tensors)}
