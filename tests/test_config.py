"""Configs: every recipe loads and validates; overrides are typed; unknown keys and bad values are one-line errors."""

import glob
import os

import pytest

from dlm_jax import config as config_lib
from dlm_jax import families
from dlm_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_KEYS = ["seed", "data.source", "data.path", "data.seq_len", "data.tokenizer", "train.num_steps",
                 "train.batch_size", "train.learning_rate", "train.log_every", "train.checkpoint_every",
                 "eval.num_batches", "mesh.data", "mesh.fsdp", "mesh.tensor"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))), ids=os.path.basename)
def test_every_config_loads_validates_and_has_the_common_keys(path):
    config = families.load_config_file(path)
    if config.data.source in ("text_files", "array_record") and not config.data.path:
        config = config_lib.apply_overrides(config, ["--config.data.path=some/file.txt"])
    for component in families.get(config.model.family).component_families:  # trained elsewhere: a path is enough
        if not config.components[component].workdir:
            config = config_lib.apply_overrides(config, [f"--config.components.{component}.workdir=some/workdir"])
    families.validate(config)
    for key in REQUIRED_KEYS:
        config_lib.get_value(config, key)


def test_required_recipes_exist_with_their_settings():
    def load(name):
        return families.load_config_file(os.path.join(ROOT, "configs", name))

    assert load("quickstart.py").data.source == "python_stdlib"
    owt, ar = load("mdlm_owt.py"), load("ar_owt.py")
    assert (owt.data.tokenizer_path, owt.data.source, owt.data.seq_len, owt.model.num_layers, owt.model.d_model) == (
        "gpt2", "hf", 1024, 12, 768)
    assert ar.model.family == "ar" and ar.data.tokenizer_path == "gpt2"
    lm1b = load("mdlm_lm1b.py")
    assert (lm1b.data.tokenizer_path, lm1b.data.source, lm1b.data.packing, lm1b.data.seq_len) == (
        "bert-base-uncased", "tfds", "pad", 128)
    text8 = load("mdlm_text8.py")
    assert (text8.data.tokenizer, text8.data.seq_len) == ("char", 256)
    assert load("shakespeare_ar.py").model.family == "ar" and load("shakespeare_mdlm.py").model.family == "mdlm"
    for name, fusion, tokenizer, length in (("ccdd_owt.py", "joint_attention", "gpt2", 1024),
                                            ("ccdd_lm1b.py", "two_stream", "bert-base-uncased", 128)):
        c = load(name)  # the paper's small: 12 x 768, latent 32
        assert (c.model.family, c.ccdd.fusion, c.ccdd.latent_dim, c.model.num_layers, c.model.d_model) == (
            "ccdd", fusion, 32, 12, 768)
        assert (c.data.tokenizer_path, c.data.seq_len) == (tokenizer, length)
    assert load("shakespeare_ccdd.py").model.family == "ccdd"
    for name, energy in (("shakespeare_edlm_ar.py", "ar"), ("shakespeare_edlm_nce.py", "nce"), ("edlm_owt.py", "nce")):
        c = load(name)
        assert (c.model.family, c.edlm.energy) == ("edlm", energy)
    assert load("edlm_owt.py").model.d_model == load("mdlm_owt.py").model.d_model  # NCE starts from that MDLM


def test_overrides_are_parsed_with_the_key_type():
    c = config_lib.apply_overrides(families.base_config(), [
        "--config.train.num_steps=7", "--config.train.learning_rate=1e-4", "--config.model.family=ar",
        "--config.model.time_conditioning=true", "--config.train.ema_decay=0",
    ])
    assert c.train.num_steps == 7 and c.train.learning_rate == 1e-4 and c.model.family == "ar"
    assert c.model.time_conditioning is True and c.train.ema_decay == 0.0 and isinstance(c.train.ema_decay, float)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.num_stepz=7", "unknown config key 'train.num_stepz'"),
        ("--config.train.num_steps=abc", "'train.num_steps' wants a int"),
        ("--config.model.scan_layers=3", "'model.scan_layers' wants a bool"),
        ("--config.train", "cannot parse argument"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message) as info:
        config_lib.apply_overrides(families.base_config(), [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.model.family=sedd", "model.family"),
        ("--config.model.num_heads=3", "not divisible by model.num_heads"),
        ("--config.data.source=text_files", "needs --config.data.path"),
        ("--config.data.tokenizer=hf", "needs --config.data.tokenizer_path"),
        ("--config.train.batch_size=0", "must be >= 1"),
    ],
)
def test_inconsistent_values_are_rejected(override, message):
    c = config_lib.apply_overrides(families.base_config(), [override])
    with pytest.raises(UserError, match=message):
        families.validate(c)


def test_config_file_with_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from dlm_jax.families import base_config\n\ndef get_config():\n"
                    "    c = base_config()\n    c.train.lr = 1.0\n    return c\n")
    with pytest.raises(UserError, match="unknown config key 'train.lr'"):
        families.load_config_file(str(path))
    with pytest.raises(UserError, match="not found"):
        families.load_config_file(str(tmp_path / "missing.py"))


def test_json_roundtrip():
    c = config_lib.apply_overrides(families.base_config(), ["--config.model.d_model=96"])
    again = families.config_from_json(config_lib.to_json(c), where="test")
    assert again.to_dict() == c.to_dict()


def test_every_family_has_its_section_and_no_family_key_is_flat_in_model():
    c = families.base_config()
    assert set(c.mdlm) == {"schedule", "schedule_power", "t_eps", "antithetic", "num_timesteps", "schedule_shift",
                           "shift_logits", "anneal_steps"}
    assert set(c.block) == {"schedule", "schedule_power", "t_eps", "antithetic", "block_size", "clip_beta",
                            "clip_omega", "resample"}
    assert "ar" not in c  # no section: nothing to configure
    assert not set(c.model) & {"schedule", "t_eps", "block_size", "clip_beta", "num_timesteps"}
    bad = config_lib.apply_overrides(c, ["--config.model.family=block", "--config.block.clip_beta=0.9",
                                         "--config.block.clip_omega=0.5"])
    with pytest.raises(UserError, match="need 0 < block.clip_beta < block.clip_omega"):
        families.validate(bad)
    with pytest.raises(UserError, match="mdlm.t_eps must be in"):
        families.validate(config_lib.apply_overrides(c, ["--config.mdlm.t_eps=0.0"]))


@pytest.mark.parametrize("name,family", [("legacy_block_config.json", "block"), ("legacy_ar_config.json", "ar")])
def test_config_json_of_an_older_workdir_loads_with_keys_moved_to_the_family_section(name, family):
    """Workdirs written before family sections (schedule, block_size, ... flat in `model`) still load."""
    path = os.path.join(ROOT, "tests", "fixtures", name)
    with open(path) as f:
        config = families.config_from_json(f.read(), where=path)
    families.validate(config)
    assert config.model.family == family
    if family == "block":
        assert (config.block.block_size, config.block.clip_beta, config.block.clip_omega) == (8, 0.3, 0.8)
        assert config.block.schedule == "cosine"
    assert config.to_dict() == families.config_from_json(config_lib.to_json(config), where="again").to_dict()
