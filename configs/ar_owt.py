"""The AR baseline for configs/mdlm_owt.py: same backbone (12 x 768), tokenizer, data and budget.

Reference: OWT val ppl 17.54 (DESIGN.md section 3).
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt.py"))
    c.model.family = "ar"
    c.model.time_conditioning = False
    return c
