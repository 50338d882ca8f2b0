"""`dlm-jax import`: public weights -> a new workdir (config.json, tokenizer, a step-0 checkpoint).

  hf_gpt2   GPT-2 in HF layout (config.json + model.safetensors + tokenizer.json) -> an `ar` workdir: a Gen PPL
            judge (--judge_workdir; GPT-2 Large is the MDLM / BD3-LM / EDLM papers' judge), an EDLM energy, an
            encoder component, a `train.init_from` source.
  hf_llada  LLaDA-style bidirectional LLaMA weights (LLaDA's own tensor names, or HF LlamaForCausalLM's) -> an
            `mdlm` workdir whose [MASK] reads the source's mask token (config mask_token_id or <|mdm_mask|>).
  dlm_jax   what `dlm-jax export` wrote -> a workdir again, bit for bit.

Vocabulary: model id i reads the source's row i for each tokenizer id. An id the source lacks (the PAD the
tokenizer appends to GPT-2's vocabulary) gets a zero embedding and a head bias of -1e9 (probability 0). The
checkpoint is a full train state (AdamW moments at zero, step 0), so `dlm-jax train --workdir=W` fine-tunes it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from dlm_jax import config as config_lib
from dlm_jax import families, fileio
from dlm_jax.errors import UserError
from dlm_jax.experiment import build_experiment, saved_config_path
from dlm_jax.train import checkpoint, sharding
from dlm_jax.train.init_from import check_fits, copy_into, flat_params
from dlm_jax.train.state import create_train_state
from dlm_jax.weights import layouts, safetensors

FORMATS = ("hf_gpt2", "hf_llada", "dlm_jax")
MASK_TOKENS = ("<|mdm_mask|>", "[MASK]", "<mask>")
MISSING_ID_BIAS = -1e9
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


def resolve_source(source: str) -> str:
    """A local (or gs://) directory as it is; else a HF hub name, downloaded (config, safetensors, tokenizer)."""
    if fileio.as_path(source).is_dir():
        return source
    if fileio.is_cloud(source) or os.path.exists(source) or not _HUB_NAME.fullmatch(source):
        raise UserError(f"--source={source!r} is not a directory (nor a hub name like gpt2 or owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "tokenizer*"])
    except Exception as e:  # noqa: BLE001 -- offline, unknown name, gated repo: one line
        raise UserError(f"--source={source!r}: no such local directory, and downloading it from the Hugging Face hub "
                        f"failed ({type(e).__name__}); connect to the network, or pass a directory holding "
                        "config.json, *.safetensors and tokenizer.json") from None


def _required_file(directory: str, name: str) -> str:
    path = fileio.join(directory, name)
    if not fileio.as_path(path).is_file():
        raise UserError(f"{directory!r} has no {name}; a checkpoint in HF layout has config.json + *.safetensors")
    return path


def _read_json(directory: str, name: str) -> dict:
    path = _required_file(directory, name)
    try:
        return json.loads(fileio.read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _check_new_workdir(workdir: str) -> None:
    if checkpoint.has_checkpoint(workdir) or fileio.as_path(saved_config_path(workdir)).is_file():
        raise UserError(f"--workdir={workdir!r} already holds a model; import into a new directory")


def _vocab_tables(converted: layouts.Converted, ids: np.ndarray, use_bias: bool) -> dict[str, np.ndarray]:
    """embed / head params of the model ids: row ids[i] of the source (-1: a zero row, and with a head bias a
    logit of -1e9)."""
    missing = ids < 0
    if missing.any() and not use_bias:
        raise UserError(f"the tokenizer has {int(missing.sum())} id(s) the weights lack (an appended PAD?) and this "
                        "architecture has no head bias to rule them out; use a tokenizer with a PAD token")
    rows = np.maximum(ids, 0)
    embed = np.where(missing[:, None], 0.0, converted.embed[rows]).astype(np.float32)
    out = {"embed/embedding": embed, "head/kernel": np.where(missing[:, None], 0.0, converted.head[rows]).T.copy()}
    if use_bias:
        out["head/bias"] = np.where(missing, MISSING_ID_BIAS, 0.0).astype(np.float32)
    return out


def _hf_config(fmt: str, converted: layouts.Converted, tokenizer_file: str) -> ml_collections.ConfigDict:
    overrides = {"model.family": "ar" if fmt == "hf_gpt2" else "mdlm",
                 "model.time_conditioning": False, "data.tokenizer": "hf", "data.tokenizer_path": tokenizer_file,
                 "data.seq_len": converted.max_len, "train.ema_decay": 0.0, "model.dropout": 0.0,
                 **{f"model.{k}": v for k, v in converted.model.items()}}
    return config_lib.apply_overrides(families.base_config(), [f"--config.{k}={v}" for k, v in overrides.items()])


def _convert_hf(fmt: str, source: str) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray], str]:
    """(config, flat params, tokenizer file) of a HF-layout checkpoint directory."""
    config_json = _read_json(source, "config.json")
    tokenizer_file = fileio.join(source, "tokenizer.json")
    if not fileio.as_path(tokenizer_file).is_file():
        raise UserError(f"{source!r} has no tokenizer.json (the HF tokenizer files go next to the weights)")
    tensors = safetensors.Checkpoint(source)
    converted = (layouts.gpt2 if fmt == "hf_gpt2" else layouts.llama)(config_json, tensors, source)
    config = _hf_config(fmt, converted, tokenizer_file)
    from dlm_jax.data.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(config.data)
    ids = np.arange(tokenizer.vocab_size)
    ids[ids >= converted.embed.shape[0]] = -1
    if fmt == "hf_llada":  # MDLM's [MASK] is appended after the tokenizer's ids: it reads the source's mask row
        mask = config_json.get("mask_token_id")
        mask = mask if mask is not None else next(
            (i for i in map(tokenizer.token_to_id, MASK_TOKENS) if i is not None), None)
        if mask is None:
            raise UserError(f"{source!r}: no mask token (config.json mask_token_id, or a token "
                            f"{' / '.join(MASK_TOKENS)}); hf_llada needs a masked diffusion model")
        ids = np.append(ids, int(mask))
    params = {**converted.params, **_vocab_tables(converted, ids, converted.model.get("use_bias", False))}
    return config, params, tokenizer_file


def _convert_dlm_jax(source: str) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray], str | None]:
    """(config, flat params, tokenizer file) of a `dlm-jax export` directory."""
    config = families.config_from_json(fileio.read_text(_required_file(source, "config.json")), where=source)
    tokenizer_file = None
    beside = fileio.join(source, config.data.tokenizer_path) if config.data.tokenizer_path else ""
    if config.data.tokenizer in ("hf", "sentencepiece") and beside and fileio.as_path(beside).is_file():
        tokenizer_file = beside  # the tokenizer file export copied next to the weights
        config = config_lib.apply_overrides(config, [f"--config.data.tokenizer_path={tokenizer_file}"])
    tensors = safetensors.Checkpoint(source)
    return config, {name.replace(".", "/"): np.asarray(tensors[name]) for name in tensors}, tokenizer_file


def _write_workdir(config: ml_collections.ConfigDict, params: dict[str, np.ndarray], workdir: str,
                   tokenizer_file: str | None, where: str) -> dict[str, Any]:
    """Checks `params` against the model of `config`, then writes config.json, the tokenizer and a step-0 train
    state (params born in their shardings) into `workdir`."""
    exp = build_experiment(config)
    fresh = jax.eval_shape(exp.family.init_params, jax.random.PRNGKey(0))
    paths = flat_params(fresh)  # {"layers/attention/query/kernel": boxed leaf}, in flatten order
    missing, extra = [p for p in paths if p not in params], sorted(set(params) - set(paths))
    if missing or extra:
        what = f"lack {missing[0]}" if missing else f"have {extra[0]}, which has no place in the model"
        raise UserError(f"{where}: the converted weights {what} ({len(missing)} missing, {len(extra)} extra); is the "
                        "checkpoint of the format given by --format?")
    treedef = jax.tree_util.tree_structure(fresh, is_leaf=lambda x: hasattr(x, "unbox"))
    tree = jax.tree_util.tree_unflatten(treedef, [params[p] for p in paths])
    copied, _ = check_fits(tree, fresh, where, "")
    is_main = jax.process_index() == 0
    if tokenizer_file is not None:  # the workdir keeps its own copy of the tokenizer
        local = fileio.join(workdir, os.path.basename(tokenizer_file))
        if is_main:
            fileio.as_path(workdir).mkdir(parents=True, exist_ok=True)
            fileio.as_path(local).write_bytes(fileio.as_path(tokenizer_file).read_bytes())
        config = config_lib.apply_overrides(config, [f"--config.data.tokenizer_path={fileio.absolute(local)}"])
    tree = jax.device_put(tree, exp.state_shardings.params)  # each device gets its shard, never the whole model
    with sharding.mesh_context(exp.mesh):
        state = create_train_state(lambda rng, src: copy_into(exp.family.init_params(rng), src), exp.optimizer,
                                   config, exp.state_shardings, tree)
    saver = checkpoint.Checkpointer(workdir, config.train.max_checkpoints)
    try:
        saver.save(0, state, {"batches": 0})
    finally:
        saver.close()
    if is_main:  # last: a workdir with a config.json holds a whole model
        fileio.write_text(saved_config_path(workdir), config_lib.to_json(config))
    return {"workdir": workdir, "family": config.model.family, "params": copied, "num_layers": config.model.num_layers,
            "d_model": config.model.d_model}


def import_weights(fmt: str, source: str, workdir: str, overrides: list[str] = ()) -> dict[str, Any]:
    """Converts the checkpoint `source` (a directory or hub name) of format `fmt` into the new workdir `workdir`;
    `overrides` (--config.KEY=VALUE) change the written config, e.g. the mesh the params are sharded over
    (--config.mesh.fsdp=8) or the compute dtype (--config.model.dtype=bfloat16); model shapes come from the source."""
    if fmt not in FORMATS:
        raise UserError(f"--format={fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_new_workdir(workdir)
    directory = resolve_source(source)
    if fmt == "dlm_jax":
        config, params, tokenizer_file = _convert_dlm_jax(directory)
    else:
        config, params, tokenizer_file = _convert_hf(fmt, directory)
    config = config_lib.apply_overrides(config, list(overrides))
    result = _write_workdir(config, params, workdir, tokenizer_file, f"--source={source!r}")
    print(f"imported {source} ({fmt}) into {workdir}: a {result['family']} model of {result['params'] / 1e6:.2f}M "
          "params")
    return {"format": fmt, "source": source, **result}
