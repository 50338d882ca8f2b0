"""CCDD "small" on LM1B (Zhou et al. 2025): 12 x 768, bert-base-uncased tokenizer, sentences padded to 128, a
32-channel latent; the paper's LM1B token-term ppl: MDLM 39.17, MDiT 29.22, MoEDiT 28.50, MMDiT 25.76 (DESIGN.md
section 5; not a bound on -log p(x): `dlm-jax eval` reports that bound as nelbo, the paper's term beside it).

dlm-jax train --config=configs/ccdd_lm1b.py --workdir=DIR --config.components.encoder.workdir=LM1B_AR_OR_MDLM_DIR
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_lm1b.py"))
    c.model.family = "ccdd"
    c.components.encoder.workdir = ""  # required: a trained LM1B AR or MDLM workdir (bert-base-uncased tokenizer)
    c.ccdd.fusion = "two_stream"  # MMDiT: the paper's best on LM1B
    c.ccdd.latent_dim = 32
    c.sample.steps = 256
    return c
