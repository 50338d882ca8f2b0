"""Data: tokenizers, document sources, the grain pipeline and offline preparation."""
