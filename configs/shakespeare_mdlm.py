"""Tiny character-level-ish (byte) MDLM on a text file, e.g. tinyshakespeare; a CPU recipe.

dlm-jax train --config=configs/shakespeare_mdlm.py --workdir=/tmp/shakespeare_mdlm \
    --config.data.path=../shared/data/tinyshakespeare.txt
"""

from dlm_jax.families import base_config


def get_config():
    c = base_config()
    c.model.family = "mdlm"
    c.model.num_layers = 4
    c.model.d_model = 192
    c.model.num_heads = 6
    c.model.scan_layers = False  # unrolled layers are ~15% faster on CPU (benchmarks/train_throughput.py)
    c.model.mlp_dim = 768
    c.data.source = "text_files"
    c.data.path = ""  # required: --config.data.path=path/to/tinyshakespeare.txt
    c.data.tokenizer = "byte"
    c.data.seq_len = 128
    c.data.val_fraction = 0.1
    c.train.num_steps = 1000
    c.train.batch_size = 32
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 100
    c.train.lr_schedule = "cosine"
    c.train.ema_decay = 0.99
    c.train.log_every = 50
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.eval.num_batches = 16
    return c
