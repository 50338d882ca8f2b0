"""Tiny Cosmos latent diffusion (stage 2) on tinyshakespeare bytes (CPU recipe): a 4 x 192 time-conditioned
transformer with U-Net skips over the 32 latent slots of a trained shakespeare cosmos_ae (stage 1), VP tan-d
schedule (d = 5), x0-prediction, self-conditioning p 0.5; sampling: 200 DDIM steps 1 -> 0.05, then the AE decoder.

dlm-jax train --config=configs/shakespeare_cosmos_ae.py --workdir=/tmp/shakespeare_cosmos_ae \
    --config.data.path=../shared/data/tinyshakespeare.txt
dlm-jax train --config=configs/shakespeare_cosmos.py --workdir=/tmp/shakespeare_cosmos \
    --config.data.path=../shared/data/tinyshakespeare.txt \
    --config.components.autoencoder.workdir=/tmp/shakespeare_cosmos_ae
dlm-jax sample --workdir=/tmp/shakespeare_cosmos --num_samples=4
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_mdlm.py"))
    c.model.family = "cosmos"
    c.model.time_conditioning = True  # always: the denoiser reads t
    c.components.autoencoder.workdir = ""  # required: a trained cosmos_ae workdir (data.seq_len must match it)
    c.cosmos.schedule_d = 5.0
    c.cosmos.self_condition = 0.5
    c.train.learning_rate = 1e-3
    c.sample.steps = 200
    return c
