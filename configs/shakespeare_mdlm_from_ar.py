"""MDLM adapted from the trained AR of configs/shakespeare_ar.py (Dream / DiffuLLaMA recipe): the AR's params
(plus a fresh [MASK] row), its output alignment kept (mdlm.shift_logits) and the training attention annealed from
causal to full over the first steps (mdlm.anneal_steps); a short fine-tune. Train the AR first:

dlm-jax train --config=configs/shakespeare_ar.py --workdir=/tmp/shakespeare_ar \
    --config.data.path=../shared/data/tinyshakespeare.txt
dlm-jax train --config=configs/shakespeare_mdlm_from_ar.py --workdir=/tmp/shakespeare_mdlm_from_ar \
    --config.data.path=../shared/data/tinyshakespeare.txt
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_mdlm.py"))
    c.model.time_conditioning = False  # as the AR: its params have no adaLN
    c.mdlm.shift_logits = True
    c.mdlm.anneal_steps = 100
    c.train.init_from = "/tmp/shakespeare_ar"
    c.train.num_steps = 300
    c.train.warmup_steps = 20
    c.train.learning_rate = 1e-3
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    return c
