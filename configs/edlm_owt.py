"""EDLM on OpenWebText (Xu et al., ICLR 2025): a frozen MDLM-small (configs/mdlm_owt.py) corrected by an energy.
Default: EDLM-NCE, the energy net initialised from the MDLM and fine-tuned by NCE; --config.edlm.energy=ar uses a
frozen OWT AR instead (configs/ar_owt.py; nothing to train). Paper (DESIGN.md section 6): Gen PPL at 256 / 1024
steps MDLM 66.8 / 42.6, EDLM-NCE 61.7 / 25.5; val ppl MDLM 23.83, EDLM-NCE 21.52, EDLM-AR 20.49.

dlm-jax train --config=configs/edlm_owt.py --workdir=gs://BUCKET/edlm_owt --config.components.mdlm.workdir=MDLM_DIR
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt.py"))
    c.model.family = "edlm"
    c.edlm.energy = "nce"
    c.edlm.num_negatives = 1
    c.edlm.num_proposals = 16
    c.components.mdlm.workdir = ""  # required: the trained OWT MDLM (GPT-2 tokenizer, these model settings)
    c.components.ar.workdir = ""  # energy=ar / coar: a trained OWT AR; optional with nce (eval adds coAR's ELBO)
    c.train.num_steps = 100_000
    c.train.learning_rate = 3e-5
    c.train.warmup_steps = 1000
    c.sample.steps = 1024
    return c
