"""EDLM-NCE on tinyshakespeare bytes (CPU recipe): an energy net initialised from the frozen shakespeare MDLM (the
same model settings) and trained to tell real text (low energy) from the MDLM's own denoised guesses.

dlm-jax train --config=configs/shakespeare_mdlm.py --workdir=/tmp/shk_mdlm --config.data.path=DATA
dlm-jax train --config=configs/shakespeare_edlm_nce.py --workdir=/tmp/shk_edlm_nce --config.data.path=DATA \
    --config.components.mdlm.workdir=/tmp/shk_mdlm
dlm-jax sample --workdir=/tmp/shk_edlm_nce --sampler=edlm --steps=64
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_mdlm.py"))
    c.model.family = "edlm"
    c.edlm.energy = "nce"
    c.edlm.num_negatives = 1
    c.edlm.num_proposals = 16
    c.components.mdlm.workdir = ""  # required: a trained shakespeare MDLM workdir (its model settings are these)
    c.train.num_steps = 500
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 50
    c.sample.steps = 64
    return c
