"""Metric sinks of the train loop: WORKDIR/metrics.jsonl (one object per logged step) and TensorBoard
(WORKDIR/tensorboard/events.out.tfevents.*), both rolled back to the restored step when a run starts."""

from __future__ import annotations

import json
import math
import struct
import sys

from dlm_jax import fileio
from dlm_jax.errors import UserError

TENSORBOARD_DIR = "tensorboard"


def _parse_lines(path: str, text: str) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is dropped, other bad lines are an
    error."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}: line {number} is not JSON ({line[:60]!r}); repair or remove it") from None
            print(f"warning: {path}: dropped a torn last line ({line[:60]!r}; a crash mid-write?)", file=sys.stderr)
    return records


def read_metrics(workdir: str) -> list[dict]:
    """All records of WORKDIR/metrics.jsonl (a torn last line is dropped with a warning)."""
    path = fileio.join(workdir, "metrics.jsonl")
    return _parse_lines(path, fileio.read_text(path))


def event_records(data: bytes) -> list[tuple[int, bytes]]:
    """(step, raw record bytes) of each whole record of a TensorBoard event file (TFRecord framing: uint64 length,
    uint32 length crc, data, uint32 data crc); a torn tail (a crash mid-write) is left out."""
    from tensorboardX.proto.event_pb2 import Event

    out, offset = [], 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        end = offset + 12 + length + 4
        if end > len(data):
            break
        try:
            step = Event.FromString(data[offset + 12:offset + 12 + length]).step
        except Exception:  # noqa: BLE001 -- protobuf's DecodeError: an unreadable record ends the readable part
            break
        out.append((step, data[offset:end]))
        offset = end
    return out


def _event_files(workdir: str) -> list[tuple]:
    """(path, bytes, records) of each event file in WORKDIR/tensorboard, in name order (not the `.partial` file a
    rewrite interrupted by a crash may leave)."""
    directory = fileio.as_path(fileio.join(workdir, TENSORBOARD_DIR))
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(p for p in directory.iterdir() if "tfevents" in p.name and not p.name.endswith(".partial")):
        data = path.read_bytes()
        out.append((path, data, event_records(data)))
    return out


def roll_back_tensorboard(workdir: str, step: int, files: list[tuple] | None = None) -> None:
    """Removes the events of steps > `step` (and torn tails) from WORKDIR/tensorboard: the kept records (the
    file-version record has step 0) are copied unchanged into one file that replaces the old ones. `files`: what
    `_event_files` returned, if read already. Nothing is written when nothing has to go."""
    files = _event_files(workdir) if files is None else files
    if all(s <= step for _, _, recs in files for s, _ in recs) and all(
            sum(len(raw) for _, raw in recs) == len(data) for _, data, recs in files):
        return
    kept = b"".join(raw for _, _, recs in files for s, raw in recs if s <= step)
    # the merged file takes the first file's name (TensorBoard reads files in name order); a crash between the
    # rename and the removals below could leave one file's kept events twice, never events of later steps
    fileio.write_bytes(files[0][0], kept)
    for path, _, _ in files[1:]:
        path.unlink()


class MetricsWriter:
    """Appends step metrics to metrics.jsonl and TensorBoard events; only process 0 writes. TensorBoard's writer is
    opened on the first `write`, after `drop_after` has rolled its files back."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        self.path = fileio.join(workdir, "metrics.jsonl")
        self._tb = None

    def drop_after(self, step: int) -> None:
        """Forgets what was logged after `step` (the restored checkpoint's, 0 for a fresh start): those steps are
        logged again. Runs on every start, so a crash before the first checkpoint leaves no duplicates."""
        if not self.enabled:
            return
        if fileio.as_path(self.path).exists():
            text = fileio.read_text(self.path)
            kept = "".join(json.dumps(r) + "\n" for r in _parse_lines(self.path, text) if r["step"] <= step)
            if kept != text:
                fileio.write_bytes(self.path, kept.encode())
        files = _event_files(self.workdir)
        if self._tb is not None and not any(s > step for _, _, recs in files for s, _ in recs):
            return  # nothing to remove: the open writer goes on appending
        self.close()  # an open writer would go on appending to a file that is being replaced: reopen on next write
        roll_back_tensorboard(self.workdir, step, files)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(fileio.join(self.workdir, TENSORBOARD_DIR))  # gs:// needs google-cloud-storage
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        fileio.append_text(self.path, json.dumps(record) + "\n")
        for key, value in metrics.items():
            if math.isfinite(float(value)):
                self._tb.add_scalar(key, float(value), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
