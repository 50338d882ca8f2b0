"""Paths that may be local or in cloud storage (gs://, s3://), for workdirs and data, through etils.epath.

Local paths behave as before (`~` expanded, recursive `**` globs); a cloud URI goes to fsspec (gcsfs for gs://,
installed by `pip install dlm-jax[gcs]`). Orbax checkpoints and array_record shards take such URIs natively.
Cloud objects cannot be appended to or renamed atomically, so `append_text` rewrites the object there.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
import os
import re

import fsspec
from etils import epath

from dlm_jax.errors import UserError

_GLOB_CHARS = re.compile(r"[*?[]")


def is_cloud(path: str | os.PathLike) -> bool:
    """True for a URI with a scheme (gs://bucket/dir), False for a local path."""
    return "://" in os.fspath(path)


def expand(path: str | os.PathLike) -> str:
    """A local path with `~` expanded; a cloud URI as it is."""
    text = os.fspath(path)
    return text if is_cloud(text) else os.path.expanduser(text)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path of a local path (`~` expanded) or of a cloud URI (its file system checked first)."""
    text = expand(path)
    if is_cloud(text):
        _check_cloud_support(text)
    return epath.Path(text)


def _check_cloud_support(uri: str) -> None:
    """A one-line error when the file system of `uri`'s scheme is not installed, or its bucket cannot be reached."""
    scheme = uri.split("://", 1)[0]
    protocol = {"gs": "gcs"}.get(scheme, scheme)
    if not (scheme == "gs" and importlib.util.find_spec("tensorflow") is not None):  # else tf.io.gfile reads it
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            extra = " (pip install -e '.[gcs]')" if scheme == "gs" else ""
            raise UserError(f"{uri!r}: no file system for {scheme}:// is installed{extra}: {e}") from e
    _check_reachable(scheme, uri.split("://", 1)[1].split("/", 1)[0])


@functools.cache
def _check_reachable(scheme: str, bucket: str) -> None:
    """One request per bucket and process, so that no network / no credentials is a one-line error up front rather
    than a traceback from deep inside a checkpoint write (a success is remembered, a failure is raised again)."""
    client_log = logging.getLogger("gcsfs")  # logs each failed retry with a traceback; the error below says it once
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        epath.Path(f"{scheme}://{bucket}").exists()
    except Exception as e:  # noqa: BLE001 -- DNS, auth, permission errors of any cloud client: one line
        text = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
        raise UserError(f"cannot reach {scheme}://{bucket} ({text}); check the network and the credentials "
                        "(gcloud auth application-default login, or the VM's service account)") from e
    finally:
        client_log.setLevel(level)


def join(path: str | os.PathLike, *parts: str) -> str:
    """`path/part/...` as a string, local or cloud (os.path.join keeps a URI's `scheme://`)."""
    return os.path.join(expand(path), *parts)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (what orbax wants); a cloud URI as it is (its file system checked)."""
    return os.fspath(as_path(path)) if is_cloud(path) else os.path.abspath(expand(path))


def nearest_existing(path: str | os.PathLike) -> str:
    """The nearest existing ancestor of the local `path` (its parent when that exists)."""
    parent = os.path.dirname(os.path.abspath(expand(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def file_above(path: str | os.PathLike) -> str | None:
    """The nearest existing ancestor of a local `path` when it is a regular file (nothing can be created under it),
    else None (also for cloud URIs, which have no such ancestors)."""
    if is_cloud(path):
        return None
    parent = nearest_existing(path)
    return None if os.path.isdir(parent) else parent


def glob_files(pattern: str) -> list[str]:
    """The files (not directories) matching `pattern`, sorted. Locally `**` matches any depth; in cloud storage
    it is refused (every level would be listed with one request per directory)."""
    if not is_cloud(pattern):
        return sorted(p for p in glob.glob(expand(pattern), recursive=True) if os.path.isfile(p))
    if "**" in pattern:
        raise UserError(f"{pattern!r}: recursive '**' globs are only supported for local paths; list the "
                        "directory levels with '*' (e.g. gs://bucket/corpus/*/*.txt)")
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARS.search(part)), len(parts))
    if fixed == len(parts):  # no wildcard: the path itself
        path = as_path(pattern)
        return [pattern] if path.is_file() else []
    root = as_path(f"{scheme}://" + "/".join(parts[:fixed]))
    return sorted(os.fspath(p) for p in root.glob("/".join(parts[fixed:])) if p.is_file())


def read_text(path: str | os.PathLike) -> str:
    """UTF-8 text of a file (undecodable bytes replaced)."""
    return as_path(path).read_bytes().decode("utf-8", errors="replace")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to a file, creating its parent directory first."""
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` whole: local files go to a temporary name first, then are renamed over the target (a reader
    never sees half a file); cloud objects are written in one request."""
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_cloud(path):
        target.write_bytes(data)
        return
    partial = target.parent / (target.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, target)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends `text` to a file (a cloud object is read and written back whole: objects cannot be appended)."""
    target = as_path(path)
    if is_cloud(path):
        target.write_text((target.read_text() if target.exists() else "") + text)
        return
    with open(target, "a") as f:
        f.write(text)
