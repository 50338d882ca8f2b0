"""Imported weights against transformers' own forward: tiny random GPT-2 and LLaMA models built with `transformers`
(PyTorch), saved in HF layout, imported with `dlm-jax import`, logits compared (float32).

    pip install -e ".[hf,bench]" transformers     # PyTorch CPU wheel: see docs/benchmarks.md
    python benchmarks/hf_reference.py                       # build, import, compare: a table + a last-line JSON
    python benchmarks/hf_reference.py --write_fixtures      # also (re)write tests/fixtures/hf/ (what CI compares to)

The fixtures (config.json, model.safetensors, tokenizer.json and reference.npz: token ids and transformers'
logits) let tests/test_weights.py check the import without PyTorch. LLaMA's logits are taken twice: causal (the
stock forward) and bidirectional (LLaDA's attention: an all-true 4-D attention mask).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import tempfile

import numpy as np
from common import write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer(specials: list[str]):
    """A character-level HF tokenizer (printable ASCII + newline, [UNK], then `specials`): tiny and offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(CHARS + ["[UNK]"] + specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def build(kind: str, directory: pathlib.Path, seed: int = 0) -> None:
    """A tiny random model of `kind` (gpt2 | llama) in HF layout with its tokenizer and reference logits."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        tok = char_tokenizer(["<|endoftext|>"])
        config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                         n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=tok.token_to_id("<|endoftext|>"),
                                         eos_token_id=tok.token_to_id("<|endoftext|>"))
        model = transformers.GPT2LMHeadModel(config)
    else:  # LLaDA-like: bidirectional use, rope_theta 5e5, eps 1e-5, a padded vocabulary with a mask token
        tok = char_tokenizer(["<|endoftext|>", "<|mdm_mask|>"])
        config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size() + 5, hidden_size=32, intermediate_size=80,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                                          tie_word_embeddings=False)
        config.mask_token_id = tok.token_to_id("<|mdm_mask|>")
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # random init is near zero: widen it so the comparison sees real activations
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    for extra in ("generation_config.json",):
        (directory / extra).unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, len(CHARS), size=(2, 16)).astype(np.int32)
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        out = {"tokens": tokens, "causal": model(ids).logits.float().numpy()}
        if kind == "llama":  # bidirectional: every pair attended (a 4-D boolean mask is used as given)
            full = torch.ones((2, 1, 16, 16), dtype=torch.bool)
            out["full"] = model(ids, attention_mask=full).logits.float().numpy()
    np.savez(directory / "reference.npz", **out)


def dlm_logits(workdir: str, tokens: np.ndarray, mask_mode: str) -> np.ndarray:
    """Logits of an imported workdir's model on `tokens` with the given attention mask."""
    from dlm_jax.experiment import load_workdir_config, restore_for_inference

    exp, params, _ = restore_for_inference(workdir, load_workdir_config(workdir))
    return np.asarray(exp.family.model.apply({"params": params}, tokens, None, mask_mode=mask_mode))


def compare(directory: pathlib.Path, kind: str) -> list[dict]:
    """Imports the fixture and returns one row per attention mode: max |dlm-jax - transformers| of the logits."""
    from dlm_jax.weights.importer import import_weights

    ref = np.load(directory / "reference.npz")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "w")
        import_weights("hf_gpt2" if kind == "gpt2" else "hf_llada", str(directory), workdir)
        for mode in ("causal", "full"):
            if mode not in ref:
                continue
            ours = dlm_logits(workdir, ref["tokens"], mode)  # [B, L, V']: the tokenizer's ids (+ [MASK] last)
            k = min(ours.shape[-1] - (kind == "llama"), ref[mode].shape[-1])  # ids both have (row i = id i)
            diff = float(np.abs(ours[..., :k] - ref[mode][..., :k]).max())
            rows.append({"model": kind, "attention": mode, "max_abs_diff": diff,
                         "logit_scale": float(np.abs(ref[mode]).max())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write_fixtures", action="store_true", help=f"write into {FIXTURES}")
    parser.add_argument("--output", default="bench_out/hf_reference.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("gpt2", "llama"):
            directory = FIXTURES / kind if args.write_fixtures else pathlib.Path(tmp) / kind
            build(kind, directory)
            rows += compare(directory, kind)
    print(f"{'model':>6s} {'attention':>9s} {'max |diff|':>11s} {'max |logit|':>11s}")
    for r in rows:
        print(f"{r['model']:>6s} {r['attention']:>9s} {r['max_abs_diff']:11.2e} {r['logit_scale']:11.3f}")
    import torch
    import transformers

    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    write_result({"benchmark": "hf_reference", "date": date, "torch": torch.__version__,
                  "transformers": transformers.__version__, "rows": rows,
                  "max_abs_diff": max(r["max_abs_diff"] for r in rows)}, args.output)


if __name__ == "__main__":
    main()
