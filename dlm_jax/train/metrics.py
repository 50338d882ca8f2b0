"""Metric sinks of the train loop: WORKDIR/metrics.jsonl (one object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math

from dlm_jax import fileio


class MetricsWriter:
    """Appends step metrics to metrics.jsonl and TensorBoard events; only process 0 writes."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = fileio.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(fileio.join(workdir, "tensorboard"))  # gs:// needs google-cloud-storage

    def drop_after(self, step: int) -> None:
        """On resume, forget lines logged after the restored checkpoint (they will be logged again)."""
        if not self.enabled or not fileio.as_path(self.path).exists():
            return
        lines = fileio.read_text(self.path).splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        fileio.write_text(self.path, "".join(kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        fileio.append_text(self.path, json.dumps(record) + "\n")
        for key, value in metrics.items():
            if math.isfinite(float(value)):
                self._tb.add_scalar(key, float(value), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of WORKDIR/metrics.jsonl."""
    return [json.loads(line) for line in fileio.read_text(fileio.join(workdir, "metrics.jsonl")).splitlines()
            if line.strip()]
