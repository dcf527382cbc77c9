"""A validating, memory-mapped reader for .safetensors files.

We read the header ourselves so that bf16 needs no torch import and a corrupt or truncated file is caught
before any tensor is used (the format: 8-byte little-endian header length, JSON header, raw data).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors spelling: F32, F16, BF16...
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsFile:
    """Header parsed and checked at open; tensors are read lazily as float32 arrays."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file is shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, 100 * 2**20):
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{self.path} is not a readable safetensors file ({e})",
                             "the file is corrupt, truncated or of another format",
                             "re-save the adapter with model.save_pretrained()") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            try:
                dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{self.path}: tensor {name!r} has a malformed header entry",
                                 "the file is corrupt", "re-save the adapter") from None
            if dtype not in _DTYPES:
                raise InputError(f"{self.path}: tensor {name!r} has dtype {dtype}, which is not supported",
                                 "adapters hold F32, F16 or BF16 weights", "re-save the adapter in one of those")
            want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
            if not (0 <= start <= end <= data_len) or end - start != want:
                raise InputError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size",
                                 "the file is truncated or corrupt", "copy or re-save the adapter again")
            self.entries[name] = TensorEntry(name, dtype, shape, start, end)
        self._mmap: np.memmap | None = None

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The tensor (or some of its rows) as float32: a copy; the file stays untouched."""
        e = self.entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + e.start:self._data_start + e.end]
        arr = raw.view(_DTYPES[e.dtype]).reshape(e.shape)
        if rows is not None:
            arr = arr[rows]
        if e.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)
