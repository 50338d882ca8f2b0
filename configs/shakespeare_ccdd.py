"""Tiny CCDD on tinyshakespeare bytes (CPU recipe): the shakespeare MDLM backbone plus a 32-channel latent from a
frozen shakespeare AR model (train configs/shakespeare_ar.py first; its final hidden state, first 32 channels).

dlm-jax train --config=configs/shakespeare_ar.py --workdir=/tmp/shakespeare_ar \
    --config.data.path=../shared/data/tinyshakespeare.txt
dlm-jax train --config=configs/shakespeare_ccdd.py --workdir=/tmp/shakespeare_ccdd \
    --config.data.path=../shared/data/tinyshakespeare.txt --config.components.encoder.workdir=/tmp/shakespeare_ar
Fusion: --config.ccdd.fusion=sum (MDiT) | two_stream (MMDiT) | joint_attention (MoEDiT).
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_mdlm.py"))
    c.model.family = "ccdd"
    c.model.time_conditioning = True  # CCDD is always time-conditioned (the latent's noise level)
    c.components.encoder.workdir = ""  # required: a trained shakespeare AR (or MDLM) workdir
    c.ccdd.fusion = "sum"
    c.ccdd.latent_dim = 32
    c.ccdd.encoder_layer = 0  # the final normed hidden state
    return c
