"""Tiny Cosmos autoencoder (stage 1) on tinyshakespeare bytes (CPU recipe): L = 128 bytes -> 32 latents of width
128 (compression 4), trainable byte embeddings (no frozen encoder needed), the paper's augmentations; data and
schedule as configs/shakespeare_mdlm.py.

dlm-jax train --config=configs/shakespeare_cosmos_ae.py --workdir=/tmp/shakespeare_cosmos_ae \
    --config.data.path=../shared/data/tinyshakespeare.txt
With a frozen encoder (a trained shakespeare MDLM or AR workdir of this codebase) and the MSE term:
    --config.cosmos_ae.encoder=frozen --config.components.encoder.workdir=/tmp/shakespeare_mdlm
Then stage 2: configs/shakespeare_cosmos.py.
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_mdlm.py"))
    c.model.family = "cosmos_ae"
    c.model.num_layers = 2  # cross-attention blocks in the compressor, and again in the decoder
    c.model.d_model = 128  # the latent width
    c.model.num_heads = 4
    c.model.mlp_dim = 512
    c.cosmos_ae.compression = 4  # 128 / 4 = 32 latents
    c.cosmos_ae.encoder = "embeddings"
    c.cosmos_ae.token_mask = 0.3
    c.cosmos_ae.mix_d = 0.7
    c.cosmos_ae.latent_dropout = 0.4
    c.train.warmup_steps = 50
    return c
