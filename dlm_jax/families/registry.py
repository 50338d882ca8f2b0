"""The registry of families and the full config schema built from it (common keys + one section per family)."""

from __future__ import annotations

import json

import ml_collections

from dlm_jax import config as config_lib
from dlm_jax.errors import UserError
from dlm_jax.families.base import Family

FAMILIES: dict[str, type[Family]] = {}

# Keys that lived in `model` before families had sections: a config.json of an older workdir still loads, each
# key moving to the section of its family that has it (and dropped where that family does not use it).
FLAT_MODEL_KEYS = ("schedule", "schedule_power", "t_eps", "antithetic", "num_timesteps", "block_size", "clip_beta",
                   "clip_omega")


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: makes a family known by its `name` (config model.family)."""
    FAMILIES[cls.name] = cls
    return cls


def get(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise UserError(f"config key 'model.family' is {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def sampler_names() -> list[str]:
    """Every sampler name of the registered families, each once, in registration order (what --help lists)."""
    return list(dict.fromkeys(name for cls in FAMILIES.values() for name in cls.samplers))


def base_config() -> ml_collections.ConfigDict:
    """The full schema with defaults: the common keys, `config.<family>` for every family that has a section,
    and `config.components.<name>.workdir` for every frozen component a family can load."""
    c = config_lib.common_config()
    for name, cls in FAMILIES.items():
        section = cls.config_section()
        if section is not None:
            c[name] = section
    c.components = ml_collections.ConfigDict()
    for cls in FAMILIES.values():
        for component in cls.component_families:
            c.components[component] = ml_collections.ConfigDict({"workdir": ""})  # a trained workdir
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    return config_lib.load_config_file(path, base_config())


def config_from_json(text: str, where: str) -> ml_collections.ConfigDict:
    """A saved config.json on today's schema; keys of older versions are moved (see FLAT_MODEL_KEYS)."""
    try:
        family = json.loads(text).get("model", {}).get("family", "mdlm")
    except (json.JSONDecodeError, AttributeError):
        family = None  # config_lib.from_json reports it
    section = FAMILIES[family].config_section() if family in FAMILIES else None
    renamed = {f"model.{k}": (f"{family}.{k}" if section is not None and k in section else None)
               for k in FLAT_MODEL_KEYS}
    return config_lib.from_json(text, where, base_config(), renamed)


def validate(config: ml_collections.ConfigDict) -> None:
    """Common checks, the family's own, and its components' workdirs being set (one-line UserErrors)."""
    config_lib.validate_common(config)
    cls = get(config.model.family)
    m = config.model
    imported = m.positions != "rotary" or m.use_bias or m.norm_eps != config_lib.DEFAULT_NORM_EPS
    if not cls.imported_layouts and imported:
        raise UserError(f"model.positions / use_bias / norm_eps (the layouts of imported weights) are for the token "
                        f"families ({', '.join(n for n, c in FAMILIES.items() if c.imported_layouts)}), not "
                        f"{cls.name}; leave them at their defaults")
    cls.validate(config)
    for component in cls.needed_components(config):
        accepted = cls.component_families[component]
        if not config.components[component].workdir:
            raise UserError(f"the {cls.name} family needs --config.components.{component}.workdir=WORKDIR "
                            f"(a trained {' or '.join(accepted)} workdir)")
