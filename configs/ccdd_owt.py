"""CCDD "small" on OpenWebText (Zhou et al. 2025): the MDLM-small backbone (12 x 768, GPT-2 tokenizer, L 1024) with a
32-channel latent per token, the MoEDiT fusion the paper reports on OWT (MDLM 33.78 vs MoEDiT 21.90 token-term ppl with
the Qwen tokenizer; DESIGN.md section 5).

The encoder is any trained workdir of this codebase with the same tokenizer: an OWT AR (configs/ar_owt.py) or MDLM
(configs/mdlm_owt.py); the paper used Qwen3-Embedding-0.6B, which plugs into the same slot once imported.
dlm-jax train --config=configs/ccdd_owt.py --workdir=gs://BUCKET/ccdd_owt --config.components.encoder.workdir=AR_DIR
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt.py"))
    c.model.family = "ccdd"
    c.components.encoder.workdir = ""  # required: a trained OWT AR or MDLM workdir (GPT-2 tokenizer)
    c.ccdd.fusion = "joint_attention"
    c.ccdd.latent_dim = 32
    c.ccdd.latent_schedule = "vp_linear"
    c.ccdd.latent_weighting = "ddpm_x"
    c.ccdd.latent_weight = 1.0
    c.ccdd.p_drop_latent = 0.1
    c.sample.steps = 256
    return c
