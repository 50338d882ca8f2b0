"""Quickstart: a tiny byte-level MDLM on the embedded corpus (the Python stdlib's .py files); minutes on 2 CPUs.

dlm-jax train --config=configs/quickstart.py --workdir=/tmp/dlm_quickstart
"""

from dlm_jax.families import base_config


def get_config():
    c = base_config()
    c.model.family = "mdlm"
    c.model.num_layers = 4
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.scan_layers = False  # unrolled layers are ~15% faster on CPU (benchmarks/train_throughput.py)
    c.model.mlp_dim = 512
    c.data.source = "python_stdlib"
    c.data.tokenizer = "byte"
    c.data.seq_len = 128
    c.data.max_documents = 400
    c.train.num_steps = 600
    c.train.batch_size = 32
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 50
    c.train.lr_schedule = "cosine"
    c.train.ema_decay = 0.99
    c.train.log_every = 50
    c.train.eval_every = 300
    c.train.checkpoint_every = 300
    c.eval.num_batches = 4
    c.sample.num_samples = 2
    c.sample.steps = 128
    return c
