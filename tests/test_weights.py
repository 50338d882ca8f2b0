"""Public weights in and out: safetensors, `dlm-jax import` (GPT-2, LLaDA / LLaMA) against transformers' logits, and
`dlm-jax export` -> import bit for bit. The fixtures in tests/fixtures/hf are tiny random models that
benchmarks/hf_reference.py built with transformers (PyTorch), with transformers' logits; no torch is needed here."""

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest

from dlm_jax import main as cli
from dlm_jax.errors import UserError
from dlm_jax.experiment import load_workdir_config, restore_for_inference
from dlm_jax.train.init_from import flat_params
from dlm_jax.weights import layouts, safetensors
from dlm_jax.weights.importer import MISSING_ID_BIAS, import_weights

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


def run_cli(capsys, *args) -> dict:
    cli.main(list(args))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def logits_of(workdir, tokens, mask_mode, **overrides):
    config = load_workdir_config(str(workdir))
    for key, value in overrides.items():
        config = cli.config_lib.apply_overrides(config, [f"--config.{key}={value}"])
    exp, params, _ = restore_for_inference(str(workdir), config)
    return exp, params, np.asarray(exp.family.model.apply({"params": params}, tokens, None, mask_mode=mask_mode))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    import_weights("hf_gpt2", str(FIXTURES / "gpt2"), str(root / "gpt2"))
    import_weights("hf_llada", str(FIXTURES / "llama"), str(root / "llada"))
    return root


def test_safetensors_round_trip_and_broken_files(tmp_path):
    tensors = {"a.kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int32),
               "c": np.array([[0.5, -3.0]], ml_dtypes.bfloat16), "d": np.zeros((0, 2), np.float16)}
    path = str(tmp_path / "x.safetensors")
    safetensors.write(path, tensors, {"format": "test"})
    back = safetensors.read(path)
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)
    raw = pathlib.Path(path).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0 and json.loads(raw[8:8 + header_len])["__metadata__"] == {"format": "test"}
    (tmp_path / "cut.safetensors").write_bytes(raw[:-4])
    with pytest.raises(UserError, match="does not fit the file"):
        safetensors.read(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(UserError, match="not a safetensors file"):
        safetensors.read(str(tmp_path / "junk.safetensors"))
    assert not list(tmp_path.glob("*.partial"))


def test_gpt2_import_matches_transformers(imported):
    ref = np.load(FIXTURES / "gpt2" / "reference.npz")
    exp, params, ours = logits_of(imported / "gpt2", ref["tokens"], "causal")
    vocab = ref["causal"].shape[-1]
    assert exp.config.model.family == "ar" and exp.config.model.positions == "learned"
    np.testing.assert_allclose(ours[..., :vocab], ref["causal"], atol=1e-4, rtol=0)
    # the PAD the tokenizer appends has no GPT-2 row: probability 0 through the head bias
    assert ours.shape[-1] == vocab + 1 and exp.tokenizer.pad_id == vocab
    assert np.all(ours[..., vocab] < MISSING_ID_BIAS / 2)
    assert float(params["head"]["bias"][vocab]) == MISSING_ID_BIAS
    # the tied head: GPT-2's embedding, transposed
    np.testing.assert_array_equal(params["head"]["kernel"][:, :vocab], params["embed"]["embedding"][:vocab].T)


def test_llada_import_matches_transformers_causal_and_bidirectional(imported):
    ref = np.load(FIXTURES / "llama" / "reference.npz")
    assert np.abs(ref["full"] - ref["causal"]).max() > 1e-2  # the two references really differ
    source_vocab = ref["full"].shape[-1]
    config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    for mode in ("causal", "full"):
        exp, params, ours = logits_of(imported / "llada", ref["tokens"], mode)
        ids = exp.tokenizer.vocab_size  # the tokenizer's ids (+ its appended PAD): rows 0..ids-1 of the source
        np.testing.assert_allclose(ours[..., :ids], ref[mode][..., :ids], atol=1e-4, rtol=0)
        # [MASK], appended last, reads the source's mask row
        np.testing.assert_allclose(ours[..., ids], ref[mode][..., config["mask_token_id"]], atol=1e-4, rtol=0)
    assert exp.config.model.family == "mdlm" and exp.family.mask_id == ids < source_vocab
    assert exp.config.model.rope_base == 500000.0 and exp.config.model.norm_eps == 1e-5


def test_llada_names_import_identically(imported, tmp_path):
    """LLaDA's own tensor names (model.transformer.blocks.N.q_proj, ff_proj = gate, ...) give the same params."""
    hf_names = safetensors.read(str(FIXTURES / "llama" / "model.safetensors"))
    inverse = {v: k for k, v in layouts.LLADA_NAMES.items()}
    block = {v: k for k, v in layouts.LLADA_BLOCK_NAMES.items()}
    renamed = {}
    for name, value in hf_names.items():
        if name in inverse:
            renamed[f"model.transformer.{inverse[name]}"] = value
        else:
            _, _, i, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            renamed[f"model.transformer.blocks.{i}.{block[module]}.{leaf}"] = value
    assert "model.transformer.blocks.0.ff_proj.weight" in renamed
    source = tmp_path / "llada_names"
    source.mkdir()
    safetensors.write(str(source / "model.safetensors"), renamed)
    for name in ("config.json", "tokenizer.json"):
        (source / name).write_bytes((FIXTURES / "llama" / name).read_bytes())
    import_weights("hf_llada", str(source), str(tmp_path / "w"))
    ours = restore_for_inference(str(tmp_path / "w"), load_workdir_config(str(tmp_path / "w")))[1]
    theirs = restore_for_inference(str(imported / "llada"), load_workdir_config(str(imported / "llada")))[1]
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_export_import_round_trip_is_bitwise(imported, tmp_path, capsys):
    out = run_cli(capsys, "export", f"--workdir={imported / 'llada'}", f"--output={tmp_path / 'out'}")
    assert out["step"] == 0 and out["tensors"] > 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    back = run_cli(capsys, "import", "--format=dlm_jax", f"--source={tmp_path / 'out'}", f"--workdir={tmp_path / 'w'}")
    assert back["family"] == "mdlm"
    before = restore_for_inference(str(imported / "llada"), load_workdir_config(str(imported / "llada")))[1]
    after = restore_for_inference(str(tmp_path / "w"), load_workdir_config(str(tmp_path / "w")))[1]
    for (path, a), b in zip(flat_params(before).items(), flat_params(after).values(), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    # exporting again gives the same tensors, and an existing export is never overwritten
    run_cli(capsys, "export", f"--workdir={tmp_path / 'w'}", f"--output={tmp_path / 'again'}")
    first, second = (safetensors.read(str(tmp_path / d / "model.safetensors")) for d in ("out", "again"))
    assert all(first[k].tobytes() == second[k].tobytes() for k in first) and first.keys() == second.keys()
    assert "already holds model.safetensors" in cli_error(capsys, "export", f"--workdir={tmp_path / 'w'}",
                                                         f"--output={tmp_path / 'out'}")


def test_import_errors_are_one_line(imported, tmp_path, capsys, offline):
    err = cli_error(capsys, "import", "--format=hf_gpt2", "--source=openai-community/gpt2-large",
                    f"--workdir={tmp_path / 'w'}")
    assert "Hugging Face hub" in err and "local directory" in err
    assert "already holds a model" in cli_error(capsys, "import", "--format=hf_gpt2",
                                                f"--source={FIXTURES / 'gpt2'}", f"--workdir={imported / 'gpt2'}")
    assert "no config.json" in cli_error(capsys, "import", "--format=hf_gpt2", f"--source={tmp_path}",
                                         f"--workdir={tmp_path / 'w'}")
    # a GPT-2 checkpoint read as LLaMA: the converter names what it misses
    assert "has no num_attention_heads" in cli_error(capsys, "import", "--format=hf_llada",
                                                     f"--source={FIXTURES / 'gpt2'}", f"--workdir={tmp_path / 'w'}")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_imported_models_sample_judge_and_shard(imported, capsys, tmp_path):
    """The LLaDA-style import, sharded over fsdp in bf16 (config overrides at import), samples, and the GPT-2 import
    judges it (Gen PPL)."""
    run_cli(capsys, "import", "--format=hf_llada", f"--source={FIXTURES / 'llama'}", f"--workdir={tmp_path / 'w'}",
            "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.model.dtype=bfloat16")
    out = run_cli(capsys, "sample", f"--workdir={tmp_path / 'w'}", "--length=16", "--steps=4", "--num_samples=2",
                  f"--judge_workdir={imported / 'gpt2'}", "--retokenize")
    assert out["family"] == "mdlm" and np.isfinite(out["gen_ppl"]) and out["gen_ppl"] > 1
    ref = np.load(FIXTURES / "llama" / "reference.npz")
    exp, params, bf16 = logits_of(tmp_path / "w", ref["tokens"], "full")
    assert exp.config.model.dtype == "bfloat16"
    kernel = params["layers"]["mlp"]["wi"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec) and len(kernel.sharding.device_set) == 8
    ids = exp.tokenizer.vocab_size
    np.testing.assert_allclose(bf16[..., :ids], ref["full"][..., :ids], atol=0.1)


def test_gpt2_import_reads_as_an_encoder_component(imported):
    """A frozen encoder (CCDD, Cosmos) reads an imported GPT-2's hidden states like any AR workdir's."""
    from dlm_jax.experiment import load_component
    from dlm_jax.models.transformer import hidden_states

    component = load_component(str(imported / "gpt2"), "encoder", ("ar", "mdlm"))
    tokens = np.load(FIXTURES / "gpt2" / "reference.npz")["tokens"]
    for layer in (0, 2):
        h = hidden_states(component.family.model, component.params, tokens, None, layer)
        assert h.shape == (*tokens.shape, component.config.model.d_model) and np.isfinite(np.asarray(h)).all()


@pytest.mark.slow
def test_llada_import_runs_every_sampler(imported, capsys, tmp_path):
    """`eval --gen` sweeps every sampler of the family that needs no other workdir."""
    out = run_cli(capsys, "eval", f"--workdir={imported / 'llada'}", "--gen", "--steps_list=4", "--length=16",
                  "--num_samples=1", f"--output_dir={tmp_path}")
    from dlm_jax import families

    own = [n for n, e in families.get("mdlm").samplers.items() if not e.components]
    assert sorted({row["sampler"] for row in out["rows"]}) == sorted(own)


@pytest.mark.slow
def test_gpt2_import_is_an_init_from_source(imported, tmp_path, corpus):
    """Fine-tuning starts from the imported params: train.init_from in a config with the same model.* settings."""
    from dlm_jax.train.loop import train

    config = cli.config_lib.apply_overrides(load_workdir_config(str(imported / "gpt2")), [
        f"--config.train.init_from={imported / 'gpt2'}", "--config.train.num_steps=2", "--config.train.batch_size=8",
        "--config.data.source=text_files", f"--config.data.path={corpus}", "--config.data.seq_len=32",
        "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.checkpoint_every=2"])
    metrics = train(config, str(tmp_path / "ft"))
    assert np.isfinite(metrics["loss"])
    ft = restore_for_inference(str(tmp_path / "ft"), load_workdir_config(str(tmp_path / "ft")))[1]
    src = restore_for_inference(str(imported / "gpt2"), load_workdir_config(str(imported / "gpt2")))[1]
    moved = np.abs(np.asarray(ft["pos_embed"]["embedding"]) - np.asarray(src["pos_embed"]["embedding"])).max()
    assert 0 < moved < 0.1  # two small steps away from GPT-2's own positions
