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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonembed.errors import ExportError

# safetensors dtype names -> torch dtype names
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


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

        entry = self._entries.get(name)
        if entry is None:
            raise ExportError(f"cannot load weights from {self.directory}: no tensor {name!r}")
        data = bytearray(entry.end - entry.start)
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            if f.readinto(data) != len(data):
                raise ExportError(f"cannot load weights: {entry.file} is shorter than its tensor {name!r}")
        dtype = getattr(torch, entry.dtype)
        if not data:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)

    def dtype(self, name: str) -> str:
        """The stored dtype's torch name (``bfloat16``, ``float32``, ...). Raises: ExportError when absent."""
        entry = self._entries.get(name)
        if entry is None:
            raise ExportError(f"cannot load weights from {self.directory}: no tensor {name!r}")
        return entry.dtype

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
