"""MDLM on LM1B (Sahoo et al. 2024): bert-base-uncased tokenizer, sentences padded to 128, 12 x 768.

Reference: LM1B val ppl <= 27.04 after 33B tokens (AR 22.32). Needs `pip install -e .[hf,tf]` and the tfds lm1b data
(tfds downloads it, or --config.data.path=TFDS_DATA_DIR with it prepared).
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt.py"))
    c.data.source = "tfds"
    c.data.name = "lm1b"
    c.data.val_split = "test"
    c.data.tokenizer = "hf"
    c.data.tokenizer_path = "bert-base-uncased"
    c.data.seq_len = 128
    c.data.packing = "pad"
    c.sample.length = 128
    return c
