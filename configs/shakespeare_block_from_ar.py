"""Block diffusion (L' = 4) adapted from a trained AR (configs/shakespeare_ar.py): the AR's params start the run
(train.init_from; the [MASK] row / column is new), then a short fine-tune with a fresh optimizer.

dlm-jax train --config=configs/shakespeare_ar.py --workdir=/tmp/shakespeare_ar \
    --config.data.path=../shared/data/tinyshakespeare.txt
dlm-jax train --config=configs/shakespeare_block_from_ar.py --workdir=/tmp/shakespeare_block_from_ar \
    --config.data.path=../shared/data/tinyshakespeare.txt --config.train.init_from=/tmp/shakespeare_ar
L' = 8: --config.block.block_size=8 --config.block.clip_beta=0.3 --config.block.clip_omega=0.8 (BD3-LM's clipped
schedule for L' = 8 and 16). The AR and this recipe must agree on model.* and data.tokenizer (they do as shipped).
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_block.py"))
    c.block.block_size = 4
    c.train.init_from = "/tmp/shakespeare_ar"  # the AR workdir of the first command
    c.train.num_steps = 300
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    return c
