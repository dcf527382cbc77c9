"""A fast GGUF reader: metadata parsed in one pass with struct, tensors memory-mapped.

gguf-py's GGUFReader builds numpy views for every element of every array field, which costs seconds on
a real vocabulary (1.6 s for 32k tokens, several for 150k). This reader returns the same values (a test
checks it field by field and tensor by tensor against GGUFReader) with plain Python objects, and tensors
with the same `data` views, `tensor_type`, `shape` (ggml order), `n_bytes` and `data_offset`.

It is the one boundary for GGUF bytes: every read is bounds-checked and the file is held to the rules of
llama.cpp's own loader (ggml/src/gguf.cpp: no duplicate or empty keys, no arrays of arrays, alignment a
power of two, at most 4 dimensions, names under 64 bytes, rows a multiple of the block size, tensors packed
in order inside the file), so a damaged, truncated or hostile file is one InputError naming the file and
the place. Metadata values are read through `get`, which checks their type.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import InputError, brief, shorten

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
          GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses longer tensor names
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1024**3  # GGUF_MAX_ARRAY_ELEMENTS, GGUF_MAX_STRING_LENGTH
_INTS = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16, GGUFValueType.UINT32,
         GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}
_FLOATS = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
_MISSING = object()


class GGUFError(InputError, ValueError):
    """A GGUF file that llama.cpp's loader would refuse too: truncated, damaged, or a value of the wrong type.
    (Also a ValueError, which this reader raised before it named the file and the place.)"""


@dataclass
class Field:
    value: Any
    types: list[GGUFValueType]  # [type] or [ARRAY, element type], like ReaderField.types

    def contents(self) -> Any:
        return self.value


@dataclass
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # ggml order (ne), like ReaderTensor.shape
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class _Short(Exception):
    """The file ends inside a structure (raised at the offset where more bytes were needed)."""


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            if size < 24:
                raise self._bad("it is empty" if size == 0 else f"it has only {size} bytes",
                                "a GGUF file starts with a 24-byte header")
            self.data = np.memmap(self.path, mode="r")
        except OSError as e:
            raise GGUFError(f"{self.path} is not a readable GGUF file", e.strerror or str(e),
                            "check the path and its permissions") from None
        buf = memoryview(self.data)
        if bytes(buf[:4]) != b"GGUF":
            raise self._bad(f"it starts with {bytes(buf[:4])!r}, not the GGUF magic", "it is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise self._bad(f"it is GGUF version {version}", "llama.cpp reads versions 2 and 3 (little-endian)")
        self._buf, self._pos, self._end = buf, 24, size
        try:
            self._parse(n_tensors, n_kv)
        except _Short:
            raise self._bad(f"it ends at byte {size} in the middle of its {self._where}",
                            "the file is truncated (an interrupted download or copy)") from None
        except RecursionError:
            raise self._bad(f"its {self._where} nests too deeply") from None
        finally:
            del self._buf

    def _bad(self, what: str, why: str = "the file is damaged, or was not written by llama.cpp's tools") -> GGUFError:
        return GGUFError(f"{self.path} is not a readable GGUF file", f"{what} ({why})" if why else what,
                         "download or convert it again")

    def _parse(self, n_tensors: int, n_kv: int) -> None:
        self._where = "header"
        if n_kv > (self._end - 24) // 12 or n_tensors > (self._end - 24) // 24:  # smallest key-value, tensor info
            raise self._bad(f"it claims {n_kv} metadata keys and {n_tensors} tensors in {self._end} bytes")
        self.fields: dict[str, Field] = {}
        for i in range(n_kv):
            self._where = f"metadata key number {i}"
            key = self._str()
            if not key:
                raise self._bad(f"metadata key number {i} is empty")
            if key in self.fields:
                raise self._bad(f"metadata key {shorten(key)!r} appears twice")
            self._where = f"metadata value of {shorten(key)}"
            vtype = self._vtype(key)
            if vtype == GGUFValueType.ARRAY:
                sub = self._vtype(key)
                if sub == GGUFValueType.ARRAY:
                    raise self._bad(f"metadata key {shorten(key)!r} is an array of arrays, which llama.cpp does "
                                    "not read")
                self.fields[key] = Field(self._array(sub, self._unpack("<Q")), [vtype, sub])
            else:
                self.fields[key] = Field(self._scalar(vtype), [vtype])
        align = 32
        if "general.alignment" in self.fields:
            f = self.fields["general.alignment"]
            align = f.value
            if f.types != [GGUFValueType.UINT32] or align == 0 or align & (align - 1):
                shown = "ARRAY of " + f.types[-1].name if len(f.types) > 1 else f.types[0].name
                raise self._bad(f"general.alignment is {brief(align)} ({shown}), not a power of two stored as "
                                "UINT32")
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            self._where = f"tensor table (entry {i})"
            name = self._str()
            if len(name.encode()) >= MAX_NAME:
                raise self._bad(f"tensor name {shorten(name)!r} has {len(name.encode())} bytes", "llama.cpp "
                                f"refuses tensor names of {MAX_NAME} bytes or more")
            if name in names:
                raise self._bad(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = self._unpack("<I")
            if n_dims > MAX_DIMS:
                raise self._bad(f"tensor {name!r} has {n_dims} dimensions", f"ggml tensors have at most {MAX_DIMS}")
            dims = tuple(self._unpack("<Q") for _ in range(n_dims)) or (1,)
            if any(d >= 2**63 for d in dims) or math.prod(dims) >= 2**63:
                raise self._bad(f"tensor {name!r} has an impossible shape {dims}")
            raw_type = self._unpack("<I")
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise self._bad(f"tensor {name!r} has type number {raw_type}, which ggml does not know") from None
            block, _ = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise self._bad(f"tensor {name!r} ({qtype.name}) has rows of {dims[0]} values, not a multiple "
                                f"of its block size {block}")
            infos.append((name, dims, qtype, self._unpack("<Q")))
        self._where = "tensor data"
        start = -(-self._pos // align) * align
        if infos and start > self._end:
            raise _Short
        self.data_offset = start
        self.tensors: list[Tensor] = []
        expected = 0
        for name, dims, qtype, offset in infos:
            n = math.prod(dims)
            block, size = GGML_QUANT_SIZES[qtype]
            n_bytes = n // block * size
            if offset != expected:
                raise self._bad(f"tensor {name!r} starts at data offset {offset}, not {expected}",
                                "llama.cpp needs tensors packed in order")
            expected += -(-n_bytes // align) * align
            begin = start + offset
            if begin + n_bytes > self._end:
                raise self._bad(f"tensor {name!r} lies beyond the end of the file (byte {begin + n_bytes} of "
                                f"{self._end})", "the file is truncated (an interrupted download or copy)")
            raw = self.data[begin:begin + n_bytes]
            np_shape = tuple(reversed(dims))
            if qtype in _NUMPY:
                view = raw.view(_NUMPY[qtype]).reshape(np_shape)
            else:
                view = raw.reshape(*np_shape[:-1], np_shape[-1] // block * size)
            self.tensors.append(Tensor(name, qtype, np.array(dims, dtype=np.uint64), n, n_bytes, begin, view))

    def _need(self, n: int) -> None:
        if n > self._end - self._pos:
            raise _Short

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self._need(size)
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return v

    def _vtype(self, key: str) -> GGUFValueType:
        raw = self._unpack("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._bad(f"metadata key {shorten(key)!r} has value type number {raw}, which GGUF does not "
                            "define") from None

    def _str(self) -> str:
        n = self._unpack("<Q")
        if n > MAX_ELEMENTS:
            raise self._bad(f"its {self._where} claims a string of {n} bytes")
        self._need(n)
        try:
            s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._bad(f"its {self._where} holds a string that is not UTF-8 ({e.reason} at byte "
                            f"{self._pos + e.start})") from None
        self._pos += n
        return s

    def _scalar(self, vtype: GGUFValueType):
        return self._str() if vtype == GGUFValueType.STRING else self._unpack(_SCALARS[vtype])

    def _array(self, sub: GGUFValueType, count: int) -> list:
        if count > MAX_ELEMENTS:
            raise self._bad(f"its {self._where} claims an array of {count} items")
        if sub == GGUFValueType.STRING:
            self._need(8 * count)
            return [self._str() for _ in range(count)]
        fmt = _SCALARS[sub]
        size = struct.calcsize(fmt)
        self._need(size * count)
        values = np.frombuffer(self._buf, dtype=np.dtype(fmt), count=count, offset=self._pos)
        self._pos += size * count
        return values.tolist()

    def get(self, key: str, kind: str, default: Any = _MISSING) -> Any:
        """A metadata value checked against `kind`: "str", "int", "float" (an int is accepted), "bool",
        "int|ints" (one integer or one per layer), "strs", "ints". A missing key gives `default`, or an error
        naming the key when there is none; a value of another type is always an error naming the key."""
        f = self.fields.get(key)
        if f is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path} has no {key} in its metadata", "llama.cpp's loader needs it too",
                                "convert the model again with llama.cpp's convert_hf_to_gguf.py")
            return default
        t, sub = f.types[0], f.types[-1]
        ok = {
            "str": t == GGUFValueType.STRING,
            "int": t in _INTS,
            "float": t in _INTS or t in _FLOATS,
            "bool": t == GGUFValueType.BOOL,
            "strs": t == GGUFValueType.ARRAY and sub == GGUFValueType.STRING,
            "ints": t == GGUFValueType.ARRAY and sub in _INTS,
            "floats": t == GGUFValueType.ARRAY and (sub in _FLOATS or sub in _INTS),  # NaN allowed
            "int|ints": t in _INTS or (t == GGUFValueType.ARRAY and sub in _INTS),
            # exactly the types llama.cpp's loader accepts (it refuses, or asserts, on any other)
            "u16": t == GGUFValueType.UINT16,
            "u32": t == GGUFValueType.UINT32,
            "f32": t == GGUFValueType.FLOAT32,
            "u32|arr": t == GGUFValueType.UINT32 or (t == GGUFValueType.ARRAY and sub in (GGUFValueType.UINT32,
                                                                                            GGUFValueType.INT32)),
            "u32s": t == GGUFValueType.ARRAY and sub == GGUFValueType.UINT32,
        }[kind]
        if ok and kind in ("float", "f32") and not math.isfinite(f.value):
            ok = False
        if not ok:
            shown = f"ARRAY of {sub.name}" if t == GGUFValueType.ARRAY else t.name
            raise GGUFError(f"{self.path}: metadata key {key} is {brief(f.value, 40)} ({shown}), not "
                            f"{_KINDS[kind]}", "the file is damaged or was not written by llama.cpp's tools",
                            "convert or download it again")
        return f.value


_KINDS = {"str": "a string", "int": "an integer", "float": "a finite number", "bool": "a boolean",
          "strs": "an array of strings", "ints": "an array of integers", "floats": "an array of numbers",
          "int|ints": "an integer or an array of integers", "u16": "a UINT16, as llama.cpp reads it",
          "u32": "a UINT32, as llama.cpp reads it", "f32": "a finite FLOAT32, as llama.cpp reads it",
          "u32|arr": "a UINT32 or an array of UINT32 / INT32, as llama.cpp reads it",
          "u32s": "an array of UINT32, as llama.cpp reads it"}


def lora_reader(path: str | Path) -> GGUFFile:
    """A GGUF LoRA whose keys have the types llama.cpp reads them as. llama.cpp asserts on them (gguf.cpp
    GGML_ASSERT in gguf_get_val_str / _f32): a wrongly typed general.type, adapter.type or adapter.lora.alpha
    aborts llama-server and llama-export-lora instead of being refused, so gguf-lora refuses such a file first."""
    reader = GGUFFile(path)
    gtype = reader.get("general.type", "str", None)
    if gtype != "adapter" or reader.get("adapter.type", "str", None) != "lora":
        raise GGUFError(f"{path} is not a GGUF LoRA adapter", "its general.type is not 'adapter' with adapter.type "
                        "'lora'", "pass a file written by gguf-lora convert (or llama.cpp's convert_lora_to_gguf.py)")
    reader.get("general.architecture", "str")
    reader.get("adapter.lora.alpha", "f32", None)
    reader.get("adapter.alora_invocation_tokens", "u32s", None)
    return reader


def general_type(path: str | Path) -> str | None:
    """general.type of a GGUF ('adapter', 'model', or None when unset); an unreadable file is an error."""
    return GGUFFile(path).get("general.type", "str", None)
