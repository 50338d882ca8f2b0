"""MDLM "small" on OpenWebText (Sahoo et al. 2024): GPT-2 tokenizer, 1024 tokens, 12 x 768, DiT time conditioning.

Reference: OWT val ppl <= 23.21 after 262B tokens (DESIGN.md section 3). Needs `pip install -e .[hf]` and network
(or a local copy: --config.data.path=DIR saved with datasets.save_to_disk, or `dlm-jax prepare` -> array_record).
"""

from dlm_jax.families import base_config


def get_config():
    c = base_config()
    c.model.family = "mdlm"
    c.model.num_layers = 12
    c.model.d_model = 768
    c.model.num_heads = 12
    c.model.mlp_dim = 3072
    c.model.mlp_type = "gelu"
    c.model.norm = "layernorm"
    c.model.time_conditioning = True
    c.model.dropout = 0.1
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"
    c.data.source = "hf"
    c.data.name = "openwebtext"
    c.data.val_split = "validation"  # openwebtext has only train: the loader carves val out of it
    c.data.tokenizer = "hf"
    c.data.tokenizer_path = "gpt2"
    c.data.seq_len = 1024
    c.data.packing = "wrap"
    c.data.num_workers = 8
    c.train.num_steps = 1_000_000
    c.train.batch_size = 512
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 2500
    c.train.lr_schedule = "constant"
    c.train.ema_decay = 0.9999
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.eval_every = 10000
    c.eval.num_batches = 100
    c.eval.batch_size = 64
    c.sample.steps = 1000
    c.sample.length = 1024
    return c
