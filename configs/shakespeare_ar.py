"""The AR baseline matching configs/shakespeare_mdlm.py (same backbone size, data and budget).

dlm-jax train --config=configs/shakespeare_ar.py --workdir=/tmp/shakespeare_ar \
    --config.data.path=../shared/data/tinyshakespeare.txt
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_mdlm.py"))
    c.model.family = "ar"
    return c
