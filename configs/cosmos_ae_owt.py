"""Cosmos autoencoder (stage 1) on OpenWebText (Meshchaninov et al. 2025, DESIGN.md section 7): L = 128 GPT-2 tokens
-> 32 latents of width 768 (compression 4; 8 for 16 latents), the frozen encoder's standardised final hidden
states (the paper: bert-base-cased; here any OWT MDLM or AR workdir of this codebase with the GPT-2 tokenizer,
configs/mdlm_owt.py), CE + MSE 1:1, token masking 0.3 / mixing d 0.7 / latent dropout 0.4 on the halves of a batch.

dlm-jax train --config=configs/cosmos_ae_owt.py --workdir=gs://BUCKET/cosmos_ae_owt \
    --config.components.encoder.workdir=MDLM_OWT_DIR
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt.py"))
    c.model.family = "cosmos_ae"
    c.model.num_layers = 6  # cross-attention blocks in the compressor, and again in the decoder
    c.model.time_conditioning = False
    c.model.dropout = 0.0
    c.components.encoder.workdir = ""  # required: a trained OWT mdlm or ar workdir (GPT-2 tokenizer)
    c.cosmos_ae.encoder = "frozen"
    c.cosmos_ae.compression = 4
    c.cosmos_ae.qk_norm = True
    c.cosmos_ae.mse_weight = 1.0
    c.cosmos_ae.stats_batches = 64
    c.data.seq_len = 128
    c.train.num_steps = 200_000
    c.train.batch_size = 256
    c.train.learning_rate = 2e-4
    c.sample.length = 128
    return c
