"""Orbax checkpoints of the train state plus the data-iterator state, with safe fallback on corruption.

Layout: WORKDIR/checkpoints/<step>/{state,data}. A checkpoint that fails to restore is never deleted:
when an older one restores, the unreadable newer ones are renamed `<step>.corrupt` (orbax ignores them)
and the user is told; when none restores, nothing is touched and a one-line error says so.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dlm_jax import fileio
from dlm_jax.errors import UserError


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:200] + ("..." if len(text) > 200 else "")


def has_checkpoint(workdir: str) -> bool:
    """Whether WORKDIR/checkpoints holds a step directory (a run there resumes); nothing is created."""
    ckpt_dir = fileio.as_path(fileio.join(workdir, "checkpoints"))
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int):
        self.directory = fileio.absolute(fileio.join(workdir, "checkpoints"))
        self._max_to_keep = max_to_keep
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, data_state, step) from the newest readable checkpoint, or None when there is none."""
        failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
                restored = self.manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint is handled the same way
                failures.append((step, _short(e)))
                continue
            if failures:
                self._set_aside([s for s, _ in failures])
                bad = ", ".join(f"step {s} ({why})" for s, why in failures)
                print(f"warning: unreadable checkpoint(s) {bad}; resumed from step {step} instead "
                      f"(the bad ones were renamed <step>.corrupt in {self.directory})", file=sys.stderr)
            return restored["state"], restored["data"], step
        if failures:
            step, why = failures[0]
            raise UserError(
                f"no readable checkpoint in {self.directory} (latest, step {step}: {why}); "
                "use a new --workdir, or fix/remove the broken step directories"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        self.manager.close()
        if jax.process_index() == 0:
            for step in steps:
                fileio.as_path(fileio.join(self.directory, str(step))).rename(
                    fileio.join(self.directory, f"{step}.corrupt"))
        self._open()


class PreemptionWatcher:
    """Turns SIGTERM (and, multi-process, the TPU maintenance notice through jax's preemption sync point) into a
    "save now and exit" decision that every process takes at the same step."""

    def __init__(self):
        self.signalled = False
        self._multi = jax.process_count() > 1
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.signalled = True

    def reached(self, step: int, sync: bool) -> bool:
        """Whether to checkpoint and stop after `step`. Multi-process: jax's preemption sync point every step,
        plus an all-gather of the SIGTERM flags when `sync` (at log steps) so all processes stop together."""
        if not self._multi:
            return self.signalled
        from jax.experimental import multihost_utils

        try:
            if multihost_utils.reached_preemption_sync_point(step):
                return True
        except RuntimeError:  # no preemption service (e.g. CPU collectives): rely on the flag exchange
            pass
        if sync:
            flags = multihost_utils.process_allgather(np.array([int(self.signalled)]))
            return bool(np.any(flags))
        return False

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
