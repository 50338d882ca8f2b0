"""Public checkpoint layouts -> this codebase's backbone: model.* settings and params, pure numpy.

Every converter reads a HF `config.json` (as a dict) and the checkpoint's tensors ({name: array}) and returns an
`Converted`: the model.* config values, the params as {"path/of/leaf": array} in this codebase's names (layers
stacked on a leading axis: the scanned layout), and the source's vocabulary tables, which `importer.py` maps onto
the tokenizer's ids. Weights of torch Linear layers are [out, in]; this codebase's kernels are [in, out(, ...)].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from dlm_jax.errors import UserError

Tensors = Mapping[str, np.ndarray]
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # tanh-approximated GELU: jax.nn.gelu's default


@dataclasses.dataclass
class Converted:
    model: dict[str, Any]  # model.* config values
    params: dict[str, np.ndarray]  # everything but the vocabulary tables, float32
    embed: np.ndarray  # [V_source, D] input embedding rows
    head: np.ndarray  # [V_source, D] output rows (the embedding itself when tied)
    max_len: int  # the context the source was trained on (data.seq_len)


def _get(tensors: Tensors, name: str, where: str) -> np.ndarray:
    if name not in tensors:
        raise UserError(f"{where}: tensor {name!r} is missing; is this checkpoint of the format given by --format?")
    return np.asarray(tensors[name], np.float32)


def _stack(layers: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-layer {path: array} -> {"layers/path": [num_layers, ...]} (nn.scan's stacked params)."""
    return {f"layers/{path}": np.stack([layer[path] for layer in layers]) for path in layers[0]}


def _count_layers(tensors: Tensors, prefix: str) -> int:
    """Layers named `prefix{i}.`: i = 0 .. n - 1."""
    n = 0
    while any(name.startswith(f"{prefix}{n}.") for name in tensors):
        n += 1
    if n == 0:
        raise UserError(f"no layers named {prefix}N.* in the checkpoint; is it of the format given by --format?")
    return n


def _required(config: dict, keys: tuple[str, ...], fmt: str) -> int:
    """The first of `keys` config.json has (an int); a one-line error naming them when it has none."""
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise UserError(f"{fmt}: config.json has no {' / '.join(keys)}; is the checkpoint of the format given by --format?")


def _unsupported(config: dict, checks: dict[str, Any], fmt: str) -> None:
    """One-line error for a config.json flag this converter cannot reproduce exactly."""
    for key, ok in checks.items():
        if key in config and config[key] != ok and config[key] is not None:
            raise UserError(f"{fmt}: config.json has {key}={config[key]!r}; only {ok!r} is supported")


def gpt2(config: dict, tensors: Tensors, where: str) -> Converted:
    """GPT-2 (GPT2LMHeadModel): learned positions, pre-LayerNorm with bias, tanh-GELU MLP, biases everywhere, head
    tied to the embedding. Its Conv1D weights are already [in, out]; c_attn holds q, k, v side by side."""
    tensors = {name.removeprefix("transformer."): value for name, value in tensors.items()}
    activation = config.get("activation_function", "gelu_new")
    if activation not in GELU_TANH:
        raise UserError(f"hf_gpt2: activation_function={activation!r} is not supported (tanh GELU: "
                        f"{', '.join(GELU_TANH)})")
    _unsupported(config, {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}, "hf_gpt2")
    d, h = _required(config, ("n_embd",), "hf_gpt2"), _required(config, ("n_head",), "hf_gpt2")
    num_layers = _count_layers(tensors, "h.")
    layers = []
    for i in range(num_layers):
        g = lambda name, i=i: _get(tensors, f"h.{i}.{name}", where)  # noqa: E731
        qkv, qkv_bias = np.split(g("attn.c_attn.weight"), 3, axis=1), np.split(g("attn.c_attn.bias"), 3)
        layer = {"norm1/scale": g("ln_1.weight"), "norm1/bias": g("ln_1.bias"),
                 "norm2/scale": g("ln_2.weight"), "norm2/bias": g("ln_2.bias"),
                 "attention/out/kernel": g("attn.c_proj.weight").reshape(h, d // h, d),
                 "attention/out/bias": g("attn.c_proj.bias"),
                 "mlp/wi/kernel": g("mlp.c_fc.weight"), "mlp/wi/bias": g("mlp.c_fc.bias"),
                 "mlp/wo/kernel": g("mlp.c_proj.weight"), "mlp/wo/bias": g("mlp.c_proj.bias")}
        for name, w, b in zip(("query", "key", "value"), qkv, qkv_bias, strict=True):
            layer[f"attention/{name}/kernel"], layer[f"attention/{name}/bias"] = w.reshape(d, h, d // h), b.reshape(
                h, d // h)
        layers.append(layer)
    positions = _get(tensors, "wpe.weight", where)
    params = {**_stack(layers), "pos_embed/embedding": positions, "final_norm/scale": _get(tensors, "ln_f.weight",
                                                                                          where),
              "final_norm/bias": _get(tensors, "ln_f.bias", where)}
    embed = _get(tensors, "wte.weight", where)
    head = _get(tensors, "lm_head.weight", where) if "lm_head.weight" in tensors else embed
    model = {"num_layers": num_layers, "d_model": d, "num_heads": h, "mlp_dim": layers[0]["mlp/wi/kernel"].shape[1],
             "mlp_type": "gelu", "norm": "layernorm", "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
             "positions": "learned", "max_positions": positions.shape[0], "use_bias": True}
    return Converted(model, params, embed, head, int(config.get("n_ctx", positions.shape[0])))


# LLaDA's own names (OLMo code) -> HF LlamaForCausalLM's
LLADA_NAMES = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
               "ff_out.weight": "lm_head.weight"}
LLADA_BLOCK_NAMES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                     "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                     "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}


def llada_to_llama_names(tensors: Tensors) -> dict[str, np.ndarray]:
    """LLaDA's `model.transformer.*` tensor names as HF LLaMA's (other names are kept)."""
    out = {}
    for name, value in tensors.items():
        short = name.removeprefix("model.transformer.")
        if short in LLADA_NAMES:
            name = LLADA_NAMES[short]
        elif short.startswith("blocks."):
            _, i, module, leaf = short.split(".", 3)
            name = f"model.layers.{i}.{LLADA_BLOCK_NAMES.get(module, module)}.{leaf}"
        out[name] = value
    return out


def llama(config: dict, tensors: Tensors, where: str) -> Converted:
    """A LLaMA-architecture model (RMSNorm, rotary on the two halves of each head, SwiGLU, no bias): HF
    LlamaForCausalLM names, or LLaDA's (converted first). Grouped K/V heads are repeated to one per query head."""
    tensors = llada_to_llama_names(tensors)
    rope = config.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta here
    config = {**config, **{k: v for k, v in rope.items() if k == "rope_theta"}}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"hf_llada: rope_type={rope['rope_type']!r} is not supported (plain rotary only)")
    get = lambda key, *alts, default=None: next((config[k] for k in (key, *alts) if k in config), default)  # noqa: E731
    _unsupported(config, {"rope_scaling": None, "attention_bias": False, "mlp_bias": False, "include_bias": False,
                          "hidden_act": "silu", "activation_type": "silu"}, "hf_llada")
    h = _required(config, ("num_attention_heads", "n_heads"), "hf_llada")
    kv_heads = int(get("num_key_value_heads", "n_kv_heads", default=h) or h)
    embed = _get(tensors, "model.embed_tokens.weight", where)
    d = embed.shape[1]
    head_dim = int(get("head_dim", default=d // h) or d // h)
    if head_dim * h != d:
        raise UserError(f"hf_llada: head_dim={head_dim} x {h} heads != hidden size {d}; not supported")
    num_layers = _count_layers(tensors, "model.layers.")

    def heads(w: np.ndarray, n: int) -> np.ndarray:  # [n * Dh, D] -> [D, H, Dh], K/V groups repeated
        return np.repeat(w.reshape(n, head_dim, d), h // n, axis=0).transpose(2, 0, 1)

    layers = []
    for i in range(num_layers):
        g = lambda name, i=i: _get(tensors, f"model.layers.{i}.{name}.weight", where)  # noqa: E731
        layers.append({"norm1/scale": g("input_layernorm"), "norm2/scale": g("post_attention_layernorm"),
                       "attention/query/kernel": heads(g("self_attn.q_proj"), h),
                       "attention/key/kernel": heads(g("self_attn.k_proj"), kv_heads),
                       "attention/value/kernel": heads(g("self_attn.v_proj"), kv_heads),
                       "attention/out/kernel": g("self_attn.o_proj").T.reshape(h, head_dim, d),
                       "mlp/wi_gate/kernel": g("mlp.gate_proj").T, "mlp/wi/kernel": g("mlp.up_proj").T,
                       "mlp/wo/kernel": g("mlp.down_proj").T})
    params = {**_stack(layers), "final_norm/scale": _get(tensors, "model.norm.weight", where)}
    head = _get(tensors, "lm_head.weight", where) if "lm_head.weight" in tensors else embed
    model = {"num_layers": num_layers, "d_model": d, "num_heads": h, "mlp_dim": layers[0]["mlp/wi/kernel"].shape[1],
             "mlp_type": "swiglu", "norm": "rmsnorm", "norm_eps": float(get("rms_norm_eps", default=1e-6)),
             "rope_base": float(get("rope_theta", default=10000.0)), "positions": "rotary", "use_bias": False}
    max_len = int(get("max_position_embeddings", "max_sequence_length", default=2048))
    return Converted(model, params, embed, head, max_len)
