"""Model families: one module per family behind a short registry; the only place that knows which is which.

  mdlm   masked diffusion (MDLM / MD4)             families/mdlm.py
  block  block diffusion (BD3-LM)                  families/block.py
  ar     autoregressive baseline / judge           families/ar.py
  ccdd   joint continuous-discrete diffusion       families/ccdd.py
  edlm   energy-based residual over a frozen MDLM  families/edlm.py
  cosmos_ae  Cosmos stage 1: latent autoencoder    families/cosmos_ae.py
  cosmos     Cosmos stage 2: latent diffusion      families/cosmos.py
A new family is one module that subclasses `base.Family` and registers itself (docs/design.md, "Adding a family").
"""

from dlm_jax.families import ar, block, ccdd, cosmos, cosmos_ae, edlm, mdlm  # noqa: F401 -- importing a family module registers it
from dlm_jax.families.base import Component, Family, Sampler
from dlm_jax.families.registry import (
    FAMILIES,
    base_config,
    config_from_json,
    get,
    load_config_file,
    register,
    sampler_names,
    validate,
)

__all__ = ["FAMILIES", "Component", "Family", "Sampler", "base_config", "config_from_json", "get",
           "load_config_file", "register", "sampler_names", "validate"]
