"""Generative perplexity: samples re-scored by a judge AR model trained by this codebase (DESIGN.md section 9).

Two rules, both pooled over samples (exp(sum of judge NLL / number of scored tokens)), printed with their names:
  gen_ppl         every token up to and including the first EOS (the whole row when there is none): the text a
                  user sees (MDLM / EDLM convention)
  gen_ppl_no_eos  every non-EOS token of the row (BD3-LM's convention)
With a judge of another tokenizer (--retokenize) each stretch between EOS ids is decoded and re-encoded and every
EOS stays an EOS, so both rules score exactly the same text as with a judge of the sample tokenizer.
Rows longer than the judge's context C (its data.seq_len) are scored with a sliding window of C tokens moved by
C / 2: each window scores only the tokens no earlier window scored, so every token is scored once, with at least
C / 2 tokens of context (`judge_windows`).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import jax
import numpy as np

from dlm_jax.data.tokenizers import Tokenizer
from dlm_jax.errors import UserError
from dlm_jax.experiment import load_workdir_config, restore_for_inference
from dlm_jax.train import sharding

GEN_PPL_RULE = "gen_ppl: judge NLL of the tokens up to and including the first EOS (whole row if none), pooled; " \
               "gen_ppl_no_eos: every non-EOS token of the row, pooled (BD3-LM); rows longer than the judge's " \
               "context C: sliding window of C, stride C/2, every token scored once"


def span_mask(row: np.ndarray, eos_id: int) -> np.ndarray:
    """1 for the tokens up to and including the first EOS (all tokens when there is none). row: [L] -> [L]."""
    hits = np.flatnonzero(np.asarray(row) == eos_id)
    end = hits[0] + 1 if len(hits) else len(row)
    return (np.arange(len(row)) < end).astype(np.float32)


def judge_windows(length: int, context: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of the windows over a row of `length` for a judge of `context` tokens: window k is
    [k C/2, k C/2 + C) (clipped to the row) and scores [first_scored, end), the tokens after the previous window's
    end; one window [0, length) when the row fits."""
    stride = max(context // 2, 1)
    windows, begin, scored = [], 0, 0
    while True:
        end = min(begin + context, length)
        windows.append((begin, end, scored))
        if end == length:
            return windows
        begin, scored = begin + stride, end


def to_judge_ids(row: np.ndarray, sample_tokenizer: Tokenizer, judge_tokenizer: Tokenizer) -> np.ndarray:
    """A sample row in the judge's ids: each stretch between EOS ids decoded and re-encoded, each EOS the judge's."""
    row = np.asarray(row)
    pieces, start = [], 0
    for cut in [*np.flatnonzero(row == sample_tokenizer.eos_id).tolist(), len(row)]:
        if cut > start:
            pieces.append(np.asarray(judge_tokenizer.encode(sample_tokenizer.decode(row[start:cut])), np.int32))
        if cut < len(row):
            pieces.append(np.array([judge_tokenizer.eos_id], np.int32))
        start = cut + 1
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


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

        def nll(params, tokens, loss_masks):
            """Summed NLL and token count under each of the masks [R, B, L]; the forward does not depend on the
            mask, so vmap over the masks runs it once."""
            terms = jax.vmap(lambda mask: family.likelihood_terms(params, {"tokens": tokens, "loss_mask": mask},
                                                                  jax.random.PRNGKey(0)))(loss_masks)
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
        return [to_judge_ids(r, sample_tokenizer, self.tokenizer) for r in rows]

    def gen_ppl(self, rows: list[np.ndarray], batch_size: int = 32) -> dict[str, Any]:
        """Pooled Gen PPL of judge-token rows under both rules (module docstring), long rows by sliding window."""
        eos, context = self.tokenizer.eos_id, self.exp.config.data.seq_len
        pieces = []  # (tokens [<= C], span mask, no-EOS mask) of every window of every row
        for row in (np.asarray(r, np.int32) for r in rows if len(r)):
            span, no_eos = span_mask(row, eos), (row != eos).astype(np.float32)
            for begin, end, scored in judge_windows(len(row), context):
                fresh = np.arange(begin, end) >= scored
                pieces.append((row[begin:end], span[begin:end] * fresh, no_eos[begin:end] * fresh))
        width = max(len(p[0]) for p in pieces)
        sums = {"span": [0.0, 0.0], "no_eos": [0.0, 0.0]}
        with sharding.mesh_context(self.exp.mesh):
            for start in range(0, len(pieces), batch_size):
                chunk = pieces[start : start + batch_size]
                tokens = np.full((len(chunk), width), self.tokenizer.pad_id, np.int32)
                masks = {rule: np.zeros((len(chunk), width), np.float32) for rule in sums}
                for i, (ids, span, no_eos) in enumerate(chunk):
                    tokens[i, : len(ids)] = ids
                    masks["span"][i, : len(ids)] = span
                    masks["no_eos"][i, : len(ids)] = no_eos
                nll_sums, counts = jax.device_get(self._nll(self.params, tokens, np.stack(list(masks.values()))))
                for rule, s, c in zip(masks, nll_sums, counts, strict=True):
                    sums[rule][0] += float(s)
                    sums[rule][1] += float(c)
        (nll, count), (nll_no_eos, count_no_eos) = sums["span"], sums["no_eos"]
        return {"gen_ppl": math.exp(min(nll / count, 700.0)), "gen_nll": nll / count, "gen_tokens": count,
                "gen_ppl_no_eos": math.exp(min(nll_no_eos / max(count_no_eos, 1.0), 700.0)),
                "gen_tokens_no_eos": count_no_eos, "gen_ppl_rule": GEN_PPL_RULE, "judge_context": context,
                "judge_windows": len(pieces)}
