"""Block diffusion (BD3-LM) matching configs/shakespeare_mdlm.py: same backbone, data and budget; L' = 4.

dlm-jax train --config=configs/shakespeare_block.py --workdir=/tmp/shakespeare_block \
    --config.data.path=../shared/data/tinyshakespeare.txt
L' = 16: --config.block.block_size=16 --config.block.clip_beta=0.3 --config.block.clip_omega=0.8 (BD3-LM's clipped
schedules: U[0.45, 0.95] for L' = 4, U[0.3, 0.8] for L' = 16). `dlm-jax eval` reports the NELBO with U[1e-3, 1]
and the variance-minimizing (beta, omega).
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_mdlm.py"))
    c.model.family = "block"
    c.model.time_conditioning = False
    c.sample.steps = 128
    return c
