"""EDLM with the AR energy on tinyshakespeare bytes (CPU recipe): a frozen shakespeare MDLM corrected by a frozen
shakespeare AR (E = -log p_AR(x_0) + log p_theta(x_0 | x_t)). Nothing is trained: `dlm-jax train` records the two
components in the workdir and finishes; sample with the importance sampler, eval the residual model.

dlm-jax train --config=configs/shakespeare_mdlm.py --workdir=/tmp/shk_mdlm --config.data.path=DATA
dlm-jax train --config=configs/shakespeare_ar.py --workdir=/tmp/shk_ar --config.data.path=DATA
dlm-jax train --config=configs/shakespeare_edlm_ar.py --workdir=/tmp/shk_edlm_ar --config.data.path=DATA \
    --config.components.mdlm.workdir=/tmp/shk_mdlm --config.components.ar.workdir=/tmp/shk_ar
dlm-jax sample --workdir=/tmp/shk_edlm_ar --sampler=edlm --sampler.k=4 --sampler.window=0.2 --steps=64
dlm-jax eval --workdir=/tmp/shk_edlm_ar            (--config.edlm.energy=coar: the carry-over AR, exact ELBO)
"""

import os

from dlm_jax.families import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_mdlm.py"))
    c.model.family = "edlm"
    c.edlm.energy = "ar"
    c.edlm.num_proposals = 16
    c.components.mdlm.workdir = ""  # required: a trained shakespeare MDLM workdir
    c.components.ar.workdir = ""  # required: a trained shakespeare AR workdir (not the Gen PPL judge)
    c.sample.steps = 64
    return c
