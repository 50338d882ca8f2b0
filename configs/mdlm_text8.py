"""MDLM on text8 (characters a-z and space), 256-character sequences, 12 x 768.

Reference: bpc AR 1.23, MDLM <= 1.40, MD4 <= 1.37 (DESIGN.md section 3). Download text8 yourself
(http://mattmahoney.net/dc/text8.zip, unzip) and pass --config.data.path=/path/to/text8; the last 5% of the
file is the val split here (the papers use the 90M/5M/5M split: --config.data.val_fraction=0.05 matches it
up to the 5M test characters).
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt.py"))
    c.data.source = "text_files"
    c.data.path = ""  # required: the unzipped text8 file
    c.data.name = ""
    c.data.tokenizer = "char"
    c.data.tokenizer_path = ""
    c.data.seq_len = 256
    c.data.val_fraction = 0.05
    c.sample.length = 256
    return c
