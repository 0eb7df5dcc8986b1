"""A checkpoint's tensors read one at a time, by name: what the bounded-memory export stages read.

``from_pretrained`` materializes every weight at once, and ``safetensors.safe_open`` maps the whole file,
so every page read stays in the process's resident set until the file is closed (the whole checkpoint
by the end of a pass). The graph builder (:mod:`tritonembed.export.qwen3_graph`) and the streamed
reference (:mod:`tritonembed.export.streamed_model`) read each tensor's bytes with a plain ``read`` instead:
one tensor in memory at a time, in its stored dtype, converted to float32 by the caller's copy.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonembed.errors import ExportError

# What one read of a large tensor's rows holds (the embedding table is read in pieces of about this size).
CHUNK_BYTES = 64 << 20
# safetensors dtype names -> torch dtype names
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def has_safetensors(path: Path) -> bool:
    """Whether the checkpoint's weights are safetensors files (what the streamed stages read)."""
    return any(Path(path).glob("*.safetensors"))


def safetensors_header(file: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file and where its data starts, read without its tensors.

    Raises:
        ExportError: the file is not a safetensors file (its length prefix does not fit the file, or the
            header is not a JSON object) -- checked before reading, so garbage never sizes an allocation.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= size - 8:
            raise ExportError(f"cannot load weights: {file} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ExportError(f"cannot load weights: {file} has a corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ExportError(f"cannot load weights: {file} has a safetensors header that is not a JSON object")
    return header, 8 + length


def _read(f: Any, start: int, length: int, file: Path, name: str) -> bytearray:
    """``length`` bytes at ``start`` of the open file ``f``. Raises: ExportError when the file is shorter."""
    data = bytearray(length)
    f.seek(start)
    if f.readinto(data) != length:
        raise ExportError(f"cannot load weights: {file} is shorter than its tensor {name!r}")
    return data


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class CheckpointTensors:
    """The tensors of a checkpoint's safetensors files by their ``Qwen3Model`` name.

    Qwen3-Embedding stores ``layers.0...`` (a ``Qwen3Model``); causal-LM checkpoints store ``model.layers.0...``.
    Both are found under the bare name.

    Raises (constructor): ExportError when there is no safetensors file or a header is corrupt.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ExportError(f"cannot load weights from {self.directory}: no *.safetensors file")
        self._entries: dict[str, _Entry] = {}
        for file in files:
            header, data_start = safetensors_header(file)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                try:
                    begin, end = (int(x) for x in info["data_offsets"])
                    entry = _Entry(file, _TORCH_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]),
                                   data_start + begin, data_start + end)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ExportError(f"cannot load weights: {file} describes {key!r} badly ({exc})") from None
                self._entries.setdefault(key[len("model."):] if key.startswith("model.") else key, entry)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def stored(self, name: str) -> Any:
        """One tensor as a torch tensor in its stored dtype, read from disk now (nothing kept).

        Raises: ExportError when the checkpoint has no tensor of that name or its file is short.
        """
        import torch

        entry = self._entry(name)
        dtype = getattr(torch, entry.dtype)
        if entry.end == entry.start:
            return torch.empty(entry.shape, dtype=dtype)
        with open(entry.file, "rb") as f:
            data = _read(f, entry.start, entry.end - entry.start, entry.file, name)
        return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape. Raises: ExportError when absent."""
        return self._entry(name).shape

    def row_chunks(self, name: str, chunk_bytes: int | None = None) -> Iterator[tuple[int, Any]]:
        """``(first row, rows)`` of a tensor along its first axis, about ``chunk_bytes`` read at a time, in its
        stored dtype: a table (Qwen3's embedding: 0.3 GB in bf16, 0.6 GB in float32) never whole in memory.

        Raises: ExportError when the checkpoint has no tensor of that name or its file is short.
        """
        import torch

        entry = self._entry(name)
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        dtype = getattr(torch, entry.dtype)
        rows = entry.shape[0] if entry.shape else 1
        row_bytes = (entry.end - entry.start) // max(rows, 1)
        step = max(1, chunk_bytes // max(row_bytes, 1))
        with open(entry.file, "rb") as f:
            for first in range(0, rows, step):
                count = min(step, rows - first)
                data = _read(f, entry.start + first * row_bytes, count * row_bytes, entry.file, name)
                yield first, torch.frombuffer(data, dtype=dtype).reshape((count, *entry.shape[1:]))

    def copy_into(self, name: str, destination: Any) -> None:
        """Copy a tensor into ``destination`` (a torch tensor of its shape, any float dtype), a chunk of rows at
        a time: the stored copy is never whole in memory beside the destination.

        Raises: ExportError when the shapes differ or the tensor is absent.
        """
        if tuple(destination.shape) != self.shape(name):
            raise ExportError(f"tensor {name!r} is {self.shape(name)} in the checkpoint, {tuple(destination.shape)} in the model")
        if not destination.dim():
            destination.copy_(self.stored(name))
            return
        for first, rows in self.row_chunks(name):
            destination[first:first + rows.shape[0]].copy_(rows)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise ExportError(f"cannot load weights from {self.directory}: no tensor {name!r}")
        return entry

    def dtype(self, name: str) -> str:
        """The stored dtype's torch name (``bfloat16``, ``float32``, ...). Raises: ExportError when absent."""
        return self._entry(name).dtype

    def as_stored(self, name: str, *, transpose: bool = False) -> np.ndarray:
        """One tensor in its stored dtype, C-contiguous; bfloat16 (which numpy lacks) as its raw 16-bit words
        in an ``int16`` array: the bytes an ONNX BFLOAT16 tensor holds."""
        import torch

        stored = self.stored(name)
        source = (stored.t() if transpose else stored).contiguous()
        if source.dtype == torch.bfloat16:
            source = source.view(torch.int16)
        return source.numpy()

    def float32(self, name: str, *, transpose: bool = False) -> np.ndarray:
        """One tensor as a float32 C-contiguous array (``transpose``: a Linear weight as MatMul's B), made
        with one float32 allocation (the stored copy is dropped when this returns)."""
        import torch

        stored = self.stored(name)
        source = stored.t() if transpose else stored
        out = torch.empty(tuple(source.shape), dtype=torch.float32)
        out.copy_(source)
        return out.numpy()
