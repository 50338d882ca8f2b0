"""Attention kernels behind one dispatcher (`attention.py`), checked against `reference.py`."""
