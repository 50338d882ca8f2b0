"""The JSONL file of `dlm-jax sample`: its path checked before anything is computed, an existing file refused when
it holds samples of other settings, and the rows written (and shown) batch by batch as they finish.

One row per sample: the settings that made it (SETTINGS order; `steps` only for samplers with diffusion steps),
then `index`, `text` and `tokens`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

from dlm_jax import fileio
from dlm_jax.errors import UserError
from dlm_jax.sampling.loop import SampleSpec

# The fields of a row that say how its sample was made; a rerun with equal values replaces the file.
SETTINGS = ("prompt", "infill", "sampler", "options", "seed", "steps", "length", "temperature", "top_p",
            "checkpoint_step")
FIX = "pass another --output=FILE"


def check_output_path(path: str) -> None:
    """A one-line UserError, before any model is loaded, when `path` cannot take the samples file: it is a
    directory, lies under a regular file, or (local paths) this process may not write it. Nothing is created."""
    if fileio.as_path(path).is_dir():
        raise UserError(f"the samples file {path} is a directory; {FIX} (a file path, e.g. {path}/samples.jsonl)")
    if fileio.is_cloud(path):
        return
    blocker = fileio.file_above(path)
    if blocker:
        raise UserError(f"the samples file {path} lies under {blocker}, a regular file, not a directory; {FIX}")
    local = os.path.abspath(fileio.expand(path))
    target, access = (local, os.W_OK) if os.path.exists(local) else (fileio.nearest_existing(path), os.W_OK | os.X_OK)
    if not os.access(target, access):
        raise UserError(f"the samples file {path} is not writable (no permission on {target}); {FIX} in a "
                        "directory you can write to")


def sample_settings(spec: SampleSpec, uses_steps: bool, prompt: str | None, infill: str | None, seed: int,
                    checkpoint_step: int) -> dict[str, Any]:
    """The settings fields of the rows of one `dlm-jax sample` call, as JSON reads them back (tuples as lists)."""
    values = {"prompt": prompt, "infill": infill, "sampler": spec.sampler,
              "options": dataclasses.asdict(spec.options), "seed": seed, "steps": spec.steps, "length": spec.length,
              "temperature": spec.temperature, "top_p": spec.top_p, "checkpoint_step": checkpoint_step}
    return json.loads(json.dumps({k: v for k, v in values.items() if uses_steps or k != "steps"}))


def other_settings(path: str, settings: dict[str, Any]) -> str | None:
    """How an existing samples file differs from `settings` (`seed: 0 there, 1 now`, or that it is no samples
    file), or None when it may be replaced: it is missing, empty, or made with the same settings."""
    target = fileio.as_path(path)
    if not target.exists():
        return None
    try:
        with target.open("r") as f:
            first = f.readline()
        if not first.strip():
            return None  # empty: no samples to lose
        row = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        row = None
    if not isinstance(row, dict):
        return "its first line is not a JSON row of `dlm-jax sample`"
    missing = "(not recorded)"
    for key in SETTINGS:
        there, now = row.get(key, missing), settings.get(key, missing)
        if there != now:
            return f"{key}: {there!r} there, {now!r} now"
    return None


def check_existing(path: str, settings: dict[str, Any]) -> None:
    """Refuses (one line naming the first differing setting) to replace an existing samples file made with other
    settings; an unreadable file counts as other settings, a missing or empty one is fine."""
    differs = other_settings(path, settings)
    if differs is not None:
        raise UserError(f"{path} holds samples made with other settings ({differs}); pass a new --output=FILE, or "
                        "delete the file to replace it")


def free_default_path(path: str, settings: dict[str, Any]) -> str:
    """The default samples file `path`, or when it holds samples of other settings the first free `STEM-N.jsonl`
    beside it (so a default path never overwrites other samples and never refuses)."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 1
    while other_settings(candidate, settings) is not None:
        candidate, n = f"{stem}-{n}{ext}", n + 1
    return candidate


class SampleWriter:
    """The `on_batch` of `dlm-jax sample` (eval.speed.BatchCallback): per finished batch, prints its samples to
    stdout, writes their rows to the JSONL file (replaced by the first batch, appended to and flushed after) and a
    progress line to stderr."""

    def __init__(self, path: str, settings: dict[str, Any], tokenizer: Any, generated_per_sample: int):
        self.path = path
        self.settings = settings
        self.tokenizer = tokenizer
        self.generated_per_sample = generated_per_sample  # the tokens a sample generates (tok/s counts these)
        self.count = 0  # samples written so far

    def __call__(self, index: int, num_batches: int, tokens: np.ndarray, seconds: float) -> None:
        lines = []
        for ids in tokens:
            text = self.tokenizer.decode(ids)
            print(f"--- sample {self.count} (step {self.settings['checkpoint_step']}, {self.settings['sampler']}) ---")
            print(text)
            row = {**self.settings, "index": self.count, "text": text, "tokens": [int(x) for x in ids]}
            lines.append(json.dumps(row) + "\n")
            self.count += 1
        sys.stdout.flush()
        (fileio.write_text if index == 0 else fileio.append_text)(self.path, "".join(lines))
        rate = self.count * self.generated_per_sample / max(seconds, 1e-9)
        print(f"batch {index + 1}/{num_batches} done ({self.count} samples, {rate:.0f} tok/s)", file=sys.stderr,
              flush=True)
