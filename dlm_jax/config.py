"""Config loading and validation: python config files with `get_config()`, `--config.key=value` overrides.

This module holds the common schema (`common_config()`: backbone, data, train, eval, sample, mesh) and the
schema-agnostic machinery; the full schema adds one section per registered family and is built by
`dlm_jax.families.base_config()`, which every recipe starts from. Unknown keys and values of the wrong type are
rejected with a one-line `UserError` naming the key.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
from typing import Any

import ml_collections

from dlm_jax.errors import UserError

DEFAULT_NORM_EPS = 1e-6  # the backbone's norm epsilon; imported weights may bring their own (model.norm_eps)

TOKENIZERS = ("byte", "char", "hf", "sentencepiece")
SOURCES = ("python_stdlib", "text_files", "tfds", "hf", "array_record")


def common_config() -> ml_collections.ConfigDict:
    """The keys every family shares, with defaults: a tiny byte-level model on the embedded python_stdlib corpus.

    Family sections (`config.mdlm`, `config.block`, ...) and `config.components` come from the registry."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.family = "mdlm"  # a registered family: dlm_jax/families/
    c.model.num_layers = 4
    c.model.d_model = 256
    c.model.num_heads = 4
    c.model.mlp_dim = 1024
    c.model.mlp_type = "swiglu"  # swiglu | gelu
    c.model.norm = "rmsnorm"  # rmsnorm | layernorm (weight-only)
    c.model.time_conditioning = False  # adaLN-zero on t (MDLM's log-linear schedule works without it)
    c.model.cond_dim = 128
    c.model.dropout = 0.0
    c.model.rope_base = 10000.0
    # imported public weights (dlm-jax import; token families only): GPT-2's learned positions and biases
    c.model.positions = "rotary"  # rotary | learned (a table of model.max_positions rows)
    c.model.max_positions = 0
    c.model.use_bias = False  # biases on q/k/v/out, the MLP, layernorm and the head
    c.model.norm_eps = DEFAULT_NORM_EPS
    c.model.scan_layers = True
    c.model.remat = "none"  # none | full | dots
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.attention_impl = "auto"  # auto | xla | pallas | cudnn | pallas_interpret (kernels/attention.py)

    c.data = ml_collections.ConfigDict()
    c.data.source = "python_stdlib"  # python_stdlib | text_files | tfds | hf | array_record
    c.data.path = ""  # text_files: glob; array_record: dir or glob; tfds: data_dir; hf: local path or ''
    c.data.name = ""  # tfds dataset name (lm1b) or HF dataset name (openwebtext)
    c.data.hf_config = ""  # HF dataset config name
    c.data.text_key = "text"
    c.data.train_split = "train"
    c.data.val_split = "validation"
    c.data.val_fraction = 0.05  # for sources without a val split
    c.data.streaming = False  # HF datasets streaming mode
    c.data.streaming_val_documents = 1000  # streaming without a val split: the first N documents are val
    c.data.document_per_line = False  # text_files: every non-empty line is a document (LM1B-style files)
    c.data.max_documents = 0  # 0: all documents
    c.data.seq_len = 128
    c.data.tokenizer = "byte"  # byte | char | hf | sentencepiece
    c.data.tokenizer_path = ""  # hf: hub name or local dir/tokenizer.json; sentencepiece: .model file
    c.data.packing = "wrap"  # wrap (concatenate + chunk) | pad (one document per row, padded)
    c.data.shuffle = True
    c.data.num_workers = 0  # grain worker processes (0: in the main process)
    # text_files reads and tokenizes its files whole in memory (about 10x their size in RAM): larger corpora are
    # refused; stream them instead (data.source=hf, data.path=FILES, data.streaming=True) or raise this (0: no limit)
    c.data.max_text_mb = 512

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 32  # global batch, split over the ('data', 'fsdp') mesh axes
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.lr_schedule = "constant"  # constant | cosine (after warmup)
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.grad_clip = 1.0  # global-norm clip; 0 disables
    c.train.ema_decay = 0.9999  # 0 disables EMA params
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.eval_every = 500  # 0 disables periodic eval
    c.train.max_checkpoints = 3
    # A trained WORKDIR to start from (e.g. an AR run for AR -> block diffusion adaptation): on a fresh start its
    # eval params (EMA when kept) become params and EMA here, with a fresh optimizer at step 0; same backbone sizes
    # and tokenizer, only the vocabulary axis may grow ([MASK]: its new rows keep their fresh init). A resume
    # ignores it (the checkpoint holds the adapted params). dlm_jax/train/init_from.py
    c.train.init_from = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.num_batches = 8  # -1: the whole val split once
    c.eval.batch_size = 32
    c.eval.use_ema = True

    c.sample = ml_collections.ConfigDict()
    c.sample.num_samples = 4
    c.sample.steps = 128
    c.sample.length = 0  # 0: data.seq_len
    c.sample.temperature = 1.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: fill with the devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


# ----------------------------------------------------------------------------------------------
# Loading and overrides


def load_config_file(path: str, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Imports a python config file and returns its `get_config()`, checked against the schema `base` and locked."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found; pass e.g. --config=configs/quickstart.py")
    spec = importlib.util.spec_from_file_location("dlm_jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 -- any failure inside the user's file is reported in one line
        raise UserError(f"config file {path!r} failed to import: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} has no get_config() function")
    try:
        config = module.get_config()
    except Exception as e:  # noqa: BLE001 -- a recipe that raises is the user's file, reported in one line
        raise UserError(f"config file {path!r}: get_config() raised {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"config file {path!r}: get_config() returned a {type(config).__name__}, not a ConfigDict")
    check_schema(config, base, where=path)
    config.lock()
    return config


def check_schema(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict, where: str) -> None:
    """Every key of `config` must exist in the schema `base` with the same type (catches typos in recipes)."""
    for key, value in flatten(config).items():
        try:
            default = get_value(base, key)
        except KeyError:
            raise UserError(f"{where}: unknown config key {key!r} (see dlm_jax/config.py and the family "
                            "sections in dlm_jax/families/)") from None
        cast(key, value, default)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` strings; the value is parsed as a python literal of the key's type."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise UserError(f"cannot parse argument {item!r}; config overrides look like --config.train.num_steps=100")
        key, raw = item[len("--config.") :].split("=", 1)
        try:
            current = get_value(config, key)
        except KeyError:
            raise UserError(f"unknown config key {key!r} in {item!r}; see dlm_jax/config.py and the family "
                            "sections in dlm_jax/families/") from None
        set_value(config, key, cast(key, parse_literal(raw), current))
    config.lock()
    return config


def parse_literal(raw: str) -> Any:
    """A command-line value as a python literal (true/false, numbers, ...), else the bare string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare string


def cast(key: str, value: Any, default: Any) -> Any:
    """Returns `value` converted to the type of `default`, or raises a one-line UserError."""
    want = type(default)
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if want is tuple and isinstance(value, (list, tuple)):  # JSON has no tuples: a config.json gives lists
        return tuple(cast(f"{key}[{i}]", v, default[0]) for i, v in enumerate(value)) if default else tuple(value)
    raise UserError(f"config key {key!r} wants a {want.__name__}, got {value!r} ({type(value).__name__})")


def get_value(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(key)
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise KeyError(key)
    return node


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    with node.unlocked():
        node[leaf] = value


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------
# Validation of values and consistency


def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config key {key!r} is {value!r}; choose one of {', '.join(allowed)}")


# numeric keys that may be negative (-1 sentinels, checked where they are read); every other number of every
# section must be >= 0
NEGATIVE_ALLOWED = ("mesh.data", "mesh.fsdp", "mesh.tensor", "eval.num_batches")
# numeric keys that must be > 0 (0 would make no sense); `validate_common` checks >= 1 for the counts
POSITIVE = ("train.learning_rate", "model.rope_base", "sample.num_samples", "sample.steps")


def check_number(key: str, value: Any, negative_ok: bool = False) -> None:
    """A number read from a config or a flag is finite and (unless `negative_ok`) >= 0; other values pass."""
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise UserError(f"{key} must be a finite number, got {v}")
        if v < 0 and not negative_ok:
            raise UserError(f"{key} must be >= 0, got {v}")


def check_numbers(config: ml_collections.ConfigDict) -> None:
    """Every number anywhere in `config` passes `check_number` (NEGATIVE_ALLOWED may be < 0); POSITIVE ones > 0."""
    for key, value in flatten(config).items():
        check_number(f"config key {key!r}", value, negative_ok=key in NEGATIVE_ALLOWED)
        if key in POSITIVE and value == 0:
            raise UserError(f"config key {key!r} must be > 0, got {value}")


def validate_common(config: ml_collections.ConfigDict) -> None:
    """Checks the common keys' values and consistency; raises a one-line UserError naming the key.

    (`dlm_jax.families.validate` runs this, then the family's own checks.)"""
    from dlm_jax.kernels.attention import IMPLS as attention_impls  # here: `dlm-jax compile` sets XLA_FLAGS first

    check_numbers(config)
    m, d, t = config.model, config.data, config.train
    choice("model.mlp_type", m.mlp_type, ("swiglu", "gelu"))
    choice("model.norm", m.norm, ("rmsnorm", "layernorm"))
    choice("model.positions", m.positions, ("rotary", "learned"))
    if m.positions == "learned" and m.max_positions < d.seq_len:
        raise UserError(f"model.positions='learned' needs model.max_positions >= data.seq_len={d.seq_len}, got "
                        f"{m.max_positions}")
    choice("model.remat", m.remat, ("none", "full", "dots"))
    choice("model.dtype", m.dtype, ("float32", "bfloat16"))
    choice("model.attention_impl", m.attention_impl, attention_impls)
    choice("data.source", d.source, SOURCES)
    choice("data.tokenizer", d.tokenizer, TOKENIZERS)
    choice("data.packing", d.packing, ("wrap", "pad"))
    choice("train.lr_schedule", t.lr_schedule, ("constant", "cosine"))
    for key in ("model.num_layers", "model.d_model", "model.num_heads", "model.mlp_dim", "data.seq_len",
                "train.num_steps", "train.batch_size", "train.log_every", "train.checkpoint_every",
                "eval.batch_size", "train.max_checkpoints", "data.streaming_val_documents"):
        if get_value(config, key) < 1:
            raise UserError(f"config key {key!r} must be >= 1, got {get_value(config, key)}")
    if m.d_model % m.num_heads:
        raise UserError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
    if (m.d_model // m.num_heads) % 2 and m.positions == "rotary":
        raise UserError(f"head dim d_model/num_heads={m.d_model // m.num_heads} must be even for rotary embeddings")
    for key in ("train.ema_decay", "train.b1", "train.b2", "model.dropout"):
        if not 0.0 <= get_value(config, key) < 1.0:
            raise UserError(f"config key {key!r} must be in [0, 1), got {get_value(config, key)}")
    if config.eval.num_batches == 0 or config.eval.num_batches < -1:
        raise UserError(f"config key 'eval.num_batches' must be >= 1 (or -1: the whole val split), got "
                        f"{config.eval.num_batches}")
    if d.source in ("text_files", "array_record") and not d.path:
        raise UserError(f"data.source={d.source!r} needs --config.data.path=... (a file glob or directory)")
    if d.tokenizer in ("hf", "sentencepiece") and not d.tokenizer_path:
        raise UserError(f"data.tokenizer={d.tokenizer!r} needs --config.data.tokenizer_path=NAME_OR_PATH")
    if not 0.0 < d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str, where: str, base: ml_collections.ConfigDict,
              renamed: dict[str, str | None] | None = None) -> ml_collections.ConfigDict:
    """Rebuilds a config saved by `to_json` (e.g. WORKDIR/config.json) on the schema `base`, filling keys added
    since with defaults. `renamed` maps keys of older versions to their new name (None: no longer used)."""
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e}); restore it or retrain in a new --workdir") from e
    renamed = renamed or {}
    for key, value in flatten(ml_collections.ConfigDict(saved)).items():
        if key in renamed:
            if renamed[key] is None:
                continue
            key = renamed[key]
        try:
            default = get_value(base, key)
        except KeyError:
            raise UserError(f"{where}: unknown config key {key!r}; was it written by a newer dlm-jax?") from None
        set_value(base, key, cast(key, value, default))
    base.lock()
    return base
