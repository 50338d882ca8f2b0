"""Orbax checkpoints of the train state plus the data-iterator state, with safe fallback on corruption.

Layout: WORKDIR/checkpoints/<step>/{state,data}. A checkpoint that fails to restore is never deleted:
when an older one restores, the unreadable newer ones are renamed `<step>.corrupt` (orbax ignores them)
and the user is told; when none restores, nothing is touched and a one-line error says so.

Saves are asynchronous: a failed one (a full disk) surfaces at the latest at the next save, log step or the end,
as a one-line error that stops training; orbax's own tracebacks of it are silenced (`_quiet_orbax_errors`).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dlm_jax import errors, fileio
from dlm_jax.errors import UserError


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:200] + ("..." if len(text) > 200 else "")


def _cause(e: BaseException) -> tuple[str, int | None]:
    """(`OSError: [Errno 28] No space left on device`, 28) for an OSError or an error text carrying an errno;
    else (the short error text, None)."""
    code = errors.os_errno(e)
    return (f"OSError: [Errno {code}] {os.strerror(code)}", code) if code is not None else (short_error(e), None)


class _OrbaxErrors(logging.Filter):
    """Drops orbax's error logs (with tracebacks, from its background threads): a failed save is reported once,
    by `Checkpointer`, as a one-line error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


@functools.cache
def _quiet_orbax_errors() -> None:
    """Once per process: orbax's error logs off (absl logs to the python logger "absl"), and the 'Event loop is
    closed' tracebacks tensorstore leaves (as unraisable exceptions) when a failed write closed orbax's loop."""
    logging.getLogger("absl").addFilter(_OrbaxErrors())
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook


def has_checkpoint(workdir: str) -> bool:
    """Whether WORKDIR/checkpoints holds a step directory (a run there resumes); nothing is created."""
    ckpt_dir = fileio.as_path(fileio.join(workdir, "checkpoints"))
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


class Checkpointer:
    """The orbax CheckpointManager of WORKDIR/checkpoints. `on_saved(step)` is called once a save is known to be
    committed (saves are asynchronous); a failed save raises a one-line UserError at the next save, `poll`, `wait`
    or `close`."""

    def __init__(self, workdir: str, max_to_keep: int, on_saved: Callable[[int], None] | None = None):
        self.directory = fileio.absolute(fileio.join(workdir, "checkpoints"))
        self._max_to_keep = max_to_keep
        self._on_saved = on_saved
        self._pending: int | None = None  # the step of the save in flight
        _quiet_orbax_errors()
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Starts saving `step` in the background, after the previous save finished (a failed one raises)."""
        self._finish()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 -- any failure to write: one line, the good checkpoints stay
            raise self._failed(step, e) from None
        self._pending = step

    def poll(self) -> None:
        """Without waiting: reports a save that finished, raises for one that failed. Single process only: with
        several, processes could see the end of a save at different steps and stop apart (they check at the next
        save and at the end, which all processes reach together)."""
        if self._pending is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
            self._finish()

    def wait(self) -> None:
        """Waits for the save in flight (a failed one raises)."""
        self._finish()

    def close(self) -> None:
        self._finish()
        self.manager.close()

    def _finish(self) -> None:
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- whatever the background write raised
            raise self._failed(step, e) from None
        if step is not None and self._on_saved is not None:
            self._on_saved(step)

    def _failed(self, step: int | None, e: Exception) -> UserError:
        """The one-line error of a failed save of `step`, naming the newest checkpoint that is still good."""
        cause, code = _cause(e)
        good = [s for s in self.steps() if s != step]
        kept = (f"the last good checkpoint (step {good[-1]}) is kept in {self.directory}" if good
                else f"no checkpoint was completed in {self.directory}")
        fix = "free space" if code in (errno.ENOSPC, errno.EDQUOT) else "fix the storage"
        rerun = "rerun to resume" if good else "rerun (training starts again from step 0)"
        return UserError(f"checkpoint save at step {step} failed ({cause}); {kept}; {fix} and {rerun}")

    def restore(self, step: int, abstract_state: Any) -> dict:
        """{'state', 'data'} of checkpoint `step` (raises what orbax raises for an unreadable one)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        return self.manager.restore(step, args=args)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, data_state, step) from the newest readable checkpoint, or None when there is none."""
        failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint is handled the same way
                failures.append((step, short_error(e)))
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
