"""Evaluation: likelihood (NELBO, ppl, bits), and later generation metrics."""
