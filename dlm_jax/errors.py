"""User-facing errors: bad input gets one clear line (what is wrong, how to fix it), no traceback.

`UserError` is raised where the code knows what the user got wrong. Everything else that escapes a command
(an OS error on a path, a missing optional extra, an out-of-memory allocation, an error inside a user's
config file) is turned into one line by `one_line` at the CLI boundary (dlm_jax/main.py); the traceback is
shown only with DLM_JAX_DEBUG=1 or --debug.
"""

from __future__ import annotations

import errno
import os
import re

DEBUG_HINT = "rerun with DLM_JAX_DEBUG=1 for the traceback"

# optional modules -> the pip extra of setup.py that installs them
EXTRAS = {"tokenizers": "hf", "datasets": "hf", "sentencepiece": "hf", "huggingface_hub": "hf", "tensorflow": "tf",
          "gcsfs": "gcs", "google": "gcs", "nbclient": "test"}


class UserError(Exception):
    """An error caused by user input (config, data, workdir). The CLI prints `error: <message>` and exits 2."""


# tensorstore (orbax's writer) reports a failed file write as e.g. ValueError("RESOURCE_EXHAUSTED: ...
# [os_error_code='28']") rather than an OSError
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of an error whose text carries one (tensorstore's writes); else None."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    match = _OS_ERROR_CODE.search(str(e))
    return int(match.group(1)) if match else None


def _os_error(e: BaseException, code: int) -> str:
    """An OS failure as `<what happened>: <path>; <what to do>`."""
    path = f": {e.filename}" if isinstance(e, OSError) and e.filename else ""
    what = (e.strerror if isinstance(e, OSError) else None) or os.strerror(code)
    fixes = {
        errno.ENOSPC: "free disk space (or use another --workdir / --output); the last good checkpoint is kept",
        errno.EDQUOT: "free space in your quota (or use another --workdir / --output)",
        errno.EROFS: "the storage is read-only; use a writable --workdir / --output",
        errno.EACCES: "no permission; use a path you can write to (or fix the permissions)",
        errno.EPERM: "no permission; use a path you can write to (or fix the permissions)",
        errno.ENOTDIR: "a part of this path is a regular file, not a directory; pick another path",
        errno.EISDIR: "this path is a directory, a file was expected; give a file path",
        errno.EEXIST: "this path exists already (as a file?); pick another path",
        errno.ENOENT: "no such file or directory; check the path",
        errno.ENOMEM: "out of host memory; lower --batch_size / train.batch_size or the model size",
    }
    fix = fixes.get(code, "check the path and the storage")
    return f"{what}{path}; {fix}"


def _out_of_memory(text: str) -> bool:
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def one_line(e: BaseException) -> str:
    """The message printed as `error: <message>` for an exception that escaped a command."""
    if isinstance(e, UserError):
        return str(e)
    code = os_errno(e)
    if code is not None:
        return _os_error(e, code)
    if isinstance(e, MemoryError) or _out_of_memory(str(e)):
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return (f"out of memory ({detail}); lower --batch_size (samples per jitted call) or --num_samples when "
                "sampling, train.batch_size or the model size when training")
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        extra = EXTRAS.get(top)
        fix = f"pip install -e '.[{extra}]'" if extra else f"pip install {top}"
        return f"the optional module {top!r} is not installed; {fix}"
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    text = text[:300] + ("..." if len(text) > 300 else "")
    return f"{text} (unexpected: {DEBUG_HINT}, and please report it)"
