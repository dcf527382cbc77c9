"""Finite output: every tensor is checked for what its *output type* makes of it.

A finite float32 value can still become Inf on the way out: F16 holds at most 65504, BF16 about 3.39e38, and
the block types store their scales in F16 (Q8_0 overflows from about 8.3e6). The check is exact for every
type and cheap, run on each chunk as it is encoded:
- F32, F16, BF16: the float32 rows' max and min against the exact value from which the conversion rounds to
  Inf (two vectorised reductions, no temporaries: a few percent of an F16 conversion);
- block types: their F16 scales (d, and dmin / m), read from the encoded bytes, one or two per block. With
  finite scales every dequantized value is finite (quants are small integers), so that is the whole check.
`encoded_finite` reads the bits of any encoded type; the tests use it to pin the boundaries above.
"""
from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

# block types: (bytes per block, offsets of its F16 fields: d, and dmin / m where the type has one)
# (ggml-common.h: block_q8_0, block_q4_0, block_q4_1, block_q5_0, block_q5_1, block_q2_K ... block_q6_K)
F16_FIELDS: dict[Q, tuple[int, tuple[int, ...]]] = {
    Q.Q8_0: (34, (0,)), Q.Q4_0: (18, (0,)), Q.Q4_1: (20, (0, 2)), Q.Q5_0: (22, (0,)), Q.Q5_1: (24, (0, 2)),
    Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)),
    Q.Q6_K: (210, (208,)),
}
# the largest finite value of a type (what the message quotes); block types: what their F16 scale allows
LARGEST = {Q.F32: 3.4028235e38, Q.F16: 65504.0, Q.BF16: 3.3895314e38, Q.Q8_0: 65504.0 * 127}


class TypeOverflow(Exception):
    """Encoded values of `qtype` hold Inf/NaN; lo/hi: the float32 range of the rows that were encoded."""

    def __init__(self, qtype: Q, lo: float, hi: float, finite_input: bool):
        super().__init__(f"{qtype.name} overflow ({lo:g} .. {hi:g})")
        self.qtype, self.lo, self.hi, self.finite_input = qtype, lo, hi, finite_input


def _any_nonfinite(words: np.ndarray, mask: int, exponent: int) -> bool:
    """Any IEEE word whose exponent bits are all ones (Inf or NaN): one masked max, no boolean temporaries."""
    return words.size > 0 and int(np.bitwise_and(words, words.dtype.type(mask)).max()) >= exponent


def encoded_finite(encoded: np.ndarray, qtype: Q) -> bool:
    """True when the encoded bytes of `qtype` (any shape, any dtype view) hold no Inf or NaN."""
    raw = np.ascontiguousarray(encoded).reshape(-1).view(np.uint8)
    if qtype == Q.F32:
        return not _any_nonfinite(raw.view(np.uint32), 0x7FFFFFFF, 0x7F800000)
    if qtype == Q.F16:
        return not _any_nonfinite(raw.view(np.uint16), 0x7FFF, 0x7C00)
    if qtype == Q.BF16:
        return not _any_nonfinite(raw.view(np.uint16), 0x7FFF, 0x7F80)
    if qtype in F16_FIELDS:
        size, offsets = F16_FIELDS[qtype]
        blocks = raw.reshape(-1, size)
        return not any(_any_nonfinite(np.ascontiguousarray(blocks[:, o:o + 2]).view(np.uint16), 0x7FFF, 0x7C00)
                       for o in offsets)
    return True  # integer types (I8 ... I64) cannot hold Inf


# F32, F16, BF16: the largest float32 that the conversion keeps finite. The conversions round to nearest
# even, so F16 overflows from 65520 (65519.99 rounds down to 65504) and BF16 from 0x7F7F8000 (half-way to Inf,
# rounded to the even Inf); a test pins both boundaries against the encoded bits.
_KEEPS_FINITE = {Q.F32: np.float32(3.4028235e38), Q.F16: np.nextafter(np.float32(65520), np.float32(0)),
                 Q.BF16: np.uint32(0x7F7F7FFF).view(np.float32)}


def check(encoded: np.ndarray, qtype: Q, rows: np.ndarray) -> None:
    """Raise TypeOverflow when `rows` (float32) encoded as `encoded` produced Inf/NaN.

    Float types: two reductions over the float32 rows against the exact rounding boundary (no temporaries;
    NaN fails both comparisons). Block types: their F16 scales, read from the encoded bytes."""
    limit = _KEEPS_FINITE.get(qtype)
    if limit is not None:
        ok = rows.size == 0 or (rows.max() <= limit and rows.min() >= -limit)
    else:
        ok = encoded_finite(encoded, qtype)
    if not ok:
        finite = bool(np.isfinite(rows).all())
        with np.errstate(invalid="ignore"):
            lo, hi = (float(np.nanmin(rows)), float(np.nanmax(rows))) if not np.isnan(rows).all() else (np.nan,) * 2
        raise TypeOverflow(qtype, lo, hi, finite)
