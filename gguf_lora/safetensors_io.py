"""A validating, memory-mapped reader for .safetensors files.

We read the header ourselves so that bf16 needs no torch import and a corrupt or truncated file is caught
before any tensor is used (the format: 8-byte little-endian header length, JSON header, raw data).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, brief, shorten

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


MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
MAX_DIMS = 8
MAX_NAME = 4096  # characters in a tensor name: real ones have under 300; longer ones only slow every regex down


class SafetensorsFile:
    """Header parsed and type-checked at open (the one boundary for these bytes); tensors are read lazily
    as float32 arrays."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("it is shorter than the 8-byte header length" if size else "it is empty")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, MAX_HEADER):
                    raise ValueError(f"its header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            reason = "its header nests too deeply" if isinstance(e, RecursionError) else _reason(e)
            raise InputError(f"{self.path} is not a readable safetensors file ({reason})",
                             "the file is corrupt, truncated or of another format",
                             "re-save it with save_pretrained() (safetensors)") from None
        if not isinstance(header, dict):
            raise self._bad("its header is not a JSON object", f"it holds {type(header).__name__}")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise self._bad("its __metadata__ is not a mapping of strings")
        self.metadata: dict[str, str] = meta or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if len(name) > MAX_NAME:
                raise self._bad(f"a tensor name has {len(name):,} characters ({shorten(name)!r})",
                                f"no model names a tensor with more than {MAX_NAME}")
            entry = _entry(name, info, data_len)
            if isinstance(entry, tuple):
                raise self._bad(f"tensor {shorten(name)!r} {entry[0]}", entry[1])
            self.entries[name] = entry
        self._mmap: np.memmap | None = None

    def _bad(self, what: str, why: str = "") -> InputError:
        return InputError(f"{self.path}: {what}", why or "the file is corrupt or was not written by safetensors",
                          "re-save it with save_pretrained() (safetensors)")

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


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique: a repeated tensor name would make the file mean two things."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {shorten(dup)!r} appears twice in its header")
    return out


def _reason(e: Exception) -> str:
    return shorten(str(e).split("\n")[0] or type(e).__name__, 200)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(name: str, info: object, data_len: int) -> TensorEntry | tuple[str, str]:
    """A checked header entry, or (what is wrong with it, why)."""
    if not isinstance(info, dict):
        return f"has a header entry that is {type(info).__name__}, not an object", ""
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        return f"has no {missing[0]} in its header entry", ""
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        return f"has a dtype that is {type(dtype).__name__}, not a string", ""
    if dtype not in _DTYPES:
        return (f"has dtype {shorten(dtype, 40)!r}, which is not supported",
                f"gguf-lora reads {', '.join(_DTYPES)}; adapters hold F32, F16 or BF16")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d) and 0 <= d < 2**62 for d in shape)):
        return f"has shape {brief(shape)}, not a list of at most {MAX_DIMS} non-negative integers", ""
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) and 0 <= x < 2**62 for x in offsets)):
        return f"has data_offsets {brief(offsets)}, not two integers (byte offsets)", ""
    start, end = offsets
    want = math.prod(shape) * _DTYPES[dtype].itemsize  # Python integers: no overflow on absurd shapes
    if not (start <= end <= data_len) or end - start != want:
        size = f"{want} bytes" if want < 2**62 else "an absurd size"
        return (f"lies outside the file or has the wrong size (bytes {start}..{end} of {data_len}; its shape "
                f"{tuple(shape)} needs {size})", "the file is truncated or corrupt")
    return TensorEntry(name, dtype, tuple(shape), start, end)
