"""BD3-LM on OpenWebText (Arriola et al. 2025): GPT-2 tokenizer, 1024 tokens, 12 x 768, blocks of L' = 4.

Reference: OWT val ppl <= 20.73 at L' = 4 (MDLM <= 22.98) after 524B tokens (DESIGN.md section 4). Clipped
schedule U[0.45, 0.95] for L' = 4; for L' = 16 use --config.block.block_size=16 --config.block.clip_beta=0.3
--config.block.clip_omega=0.8. No time conditioning (every block has its own t).
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt.py"))
    c.model.family = "block"
    c.model.time_conditioning = False
    return c
