"""Generative perplexity: samples re-scored by a judge AR model trained by this codebase (DESIGN.md section 9).

Per sample the scored tokens are all tokens up to and including the first EOS (all of them when there is
none); Gen PPL = exp(sum of judge NLL / number of scored tokens), pooled over samples.
"""

from __future__ import annotations

import math
import sys

import jax
import numpy as np

from dlm_jax.data.tokenizers import Tokenizer
from dlm_jax.errors import UserError
from dlm_jax.experiment import load_workdir_config, restore_for_inference
from dlm_jax.train import sharding


def scored_rows(rows: list[np.ndarray], eos_id: int) -> list[np.ndarray]:
    """Each row cut after its first EOS (kept); rows without EOS stay whole."""
    out = []
    for row in rows:
        row = np.asarray(row)
        hits = np.flatnonzero(row == eos_id)
        out.append(row[: hits[0] + 1] if len(hits) else row)
    return out


class Judge:
    """An AR checkpoint (`dlm-jax train` with model.family=ar) that scores token sequences."""

    def __init__(self, workdir: str):
        config = load_workdir_config(workdir)
        if config.model.family != "ar":
            raise UserError(f"the judge in {workdir!r} is a {config.model.family!r} model; Gen PPL needs an AR "
                            "checkpoint (train one with configs/shakespeare_ar.py or configs/ar_owt.py)")
        self.workdir = workdir
        self.exp, self.params, self.step = restore_for_inference(workdir, config)
        self.tokenizer: Tokenizer = self.exp.tokenizer
        family = self.exp.family

        def nll(params, tokens, loss_mask):
            terms = family.likelihood_terms(params, {"tokens": tokens, "loss_mask": loss_mask}, jax.random.PRNGKey(0))
            return terms["nll_sum"], terms["num_tokens"]

        self._nll = jax.jit(nll)

    def prepare(self, rows: np.ndarray, sample_tokenizer: Tokenizer, retokenize: bool) -> list[np.ndarray]:
        """Sample rows as judge token ids: the same ids when the tokenizers agree, else re-tokenized text."""
        if sample_tokenizer.describe() == self.tokenizer.describe():
            return [np.asarray(r) for r in rows]
        if not retokenize:
            raise UserError(f"the judge uses tokenizer {self.tokenizer.name!r}, the samples {sample_tokenizer.name!r}; "
                            "pass --retokenize to score the decoded text with the judge's tokenizer")
        print(f"note: re-tokenizing samples from {sample_tokenizer.name} to the judge's {self.tokenizer.name}",
              file=sys.stderr)
        return [np.append(self.tokenizer.encode(sample_tokenizer.decode(r)), self.tokenizer.eos_id) for r in rows]

    def gen_ppl(self, rows: list[np.ndarray], batch_size: int = 32) -> dict[str, float]:
        """Pooled Gen PPL of judge-token rows (cut after the first EOS)."""
        rows = scored_rows(rows, self.tokenizer.eos_id)
        width = max(len(r) for r in rows)
        nll_sum, count = 0.0, 0.0
        with sharding.mesh_context(self.exp.mesh):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                tokens = np.full((len(chunk), width), self.tokenizer.pad_id, np.int32)
                mask = np.zeros((len(chunk), width), np.float32)
                for i, r in enumerate(chunk):
                    tokens[i, : len(r)], mask[i, : len(r)] = r, 1.0
                s, c = jax.device_get(self._nll(self.params, tokens, mask))
                nll_sum, count = nll_sum + float(s), count + float(c)
        return {"gen_ppl": math.exp(min(nll_sum / count, 700.0)), "gen_nll": nll_sum / count,
                "gen_tokens": count}
