"""The safetensors file format, read and written with numpy (no torch, no pickle).

A file is an 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype", "shape", "data_offsets":
[begin, end]}, optional "__metadata__": {str: str}}), then the tensors' raw little-endian bytes. Local files are
memory-mapped (an 8B checkpoint is read tensor by tensor, never whole); sharded checkpoints are a
`model.safetensors.index.json` whose `weight_map` names the file of each tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from dlm_jax import fileio
from dlm_jax.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20


def _header(data: np.ndarray | bytes, path: str) -> tuple[dict, int]:
    """(header dict, offset of the data section) of the file bytes `data`; one-line errors for a broken file."""
    if len(data) < 8:
        raise UserError(f"{path} is not a safetensors file (only {len(data)} bytes); download it again")
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    if size > MAX_HEADER or 8 + size > len(data):
        raise UserError(f"{path} is not a safetensors file (header of {size} bytes in a {len(data)}-byte file); "
                        "download it again")
    try:
        header = json.loads(bytes(data[8:8 + size]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: the safetensors header is not JSON; download the file again") from None
    return header, 8 + size


def read(path: str) -> dict[str, np.ndarray]:
    """{name: array} of one safetensors file (memory-mapped views when the file is local)."""
    if fileio.is_cloud(path):
        data: np.ndarray | bytes = fileio.as_path(path).read_bytes()
    else:
        if not os.path.isfile(path):
            raise UserError(f"no safetensors file {path!r}")
        data = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else b""
    header, start = _header(data, path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, not one of {', '.join(DTYPES)}")
        begin, end = info["data_offsets"]
        dtype, shape = np.dtype(DTYPES[info["dtype"]]), tuple(info["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)) or start + end > len(data):
            raise UserError(f"{path}: tensor {name!r} does not fit the file (truncated download?); download it again")
        raw = data[start + begin:start + end]
        out[name] = np.frombuffer(raw, dtype).reshape(shape) if isinstance(raw, bytes) else raw.view(dtype).reshape(
            shape)
    return out


class Checkpoint(Mapping):
    """The tensors of a directory: `model.safetensors`, or the shards a `model.safetensors.index.json` lists
    (opened lazily), or else every `*.safetensors` file in it."""

    def __init__(self, directory: str):
        self.directory = directory
        index = fileio.join(directory, "model.safetensors.index.json")
        single = fileio.join(directory, "model.safetensors")
        if fileio.as_path(index).is_file():
            weight_map = json.loads(fileio.read_text(index)).get("weight_map", {})
            self._file_of = {name: fileio.join(directory, file) for name, file in weight_map.items()}
        else:
            files = [single] if fileio.as_path(single).is_file() else fileio.glob_files(
                fileio.join(directory, "*.safetensors"))
            if not files:
                raise UserError(f"{directory!r} holds no *.safetensors weights (PyTorch .bin / pickle files are not "
                                "read: convert them to safetensors first)")
            self._file_of = {name: file for file in files for name in read(file)}
        self._open: dict[str, dict[str, np.ndarray]] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._file_of[name]
        if file not in self._open:
            self._open[file] = read(file)
        return self._open[file][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def write(path: str, tensors: Mapping[str, np.ndarray], meta: dict[str, str] | None = None) -> None:
    """Writes `tensors` (sorted by name) to `path` as safetensors: first to `path.partial`, then renamed over it, so
    an interrupted write never leaves a truncated file under the final name."""
    header, offset = {}, 0
    names = sorted(tensors)
    for name in names:
        array = tensors[name]
        if array.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if meta:
        header["__metadata__"] = meta
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    target = fileio.as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = fileio.as_path(f"{path}.partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())  # little-endian: every platform jax runs on
    partial.rename(target)
