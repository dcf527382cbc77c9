"""The compiled kernels (gguf_lora/kquant_jit.py) against references we did not write: numpy's float16
rounding for GGML_FP32_TO_FP16, gguf-py's dequantize for decoding, and (for encoding, beside the byte
comparisons with llama-quantize in test_quantize_identity.py) the numpy fallback on planted edge cases:
zero, constant, huge, tiny and subnormal blocks, values at fp16 rounding ties, lone spikes."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

import gguf_lora.quants as quants
from gguf_lora import kquant_jit

Q = gguf.GGMLQuantizationType


def test_fp16_rounding_matches_numpy_on_every_tie():
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    halves = halves[np.isfinite(halves)]
    halves.sort()
    mids = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)  # the ties, exactly
    rng = np.random.default_rng(0)
    x = np.concatenate([halves, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                        *(rng.standard_normal(1 << 16).astype(np.float32) * s for s in (1e-9, 1e-6, 1e-3, 1, 1e3)),
                        np.array([65504, 65519.996, 65520, 1e10, -1e10, 6e-8, 2.9e-8, 3e-8], np.float32)])
    ours = np.empty(x.size, np.int64)
    kquant_jit.f16_bits_array(x, ours)
    assert np.array_equal(ours, x.astype(np.float16).view(np.uint16).astype(np.int64))
    wrong = x * np.float32(1 + 2 ** -12)  # a deliberately different input must be caught
    assert not np.array_equal(ours, wrong.astype(np.float16).view(np.uint16).astype(np.int64))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0])
def test_decode_matches_gguf_py(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (64, 8 * size), dtype=np.uint8)  # every bit pattern, NaN/inf scales included
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        ours = quants.decode(raw, qtype)
        real = quants.encode((rng.standard_normal((16, 8 * block)) * 0.02).astype(np.float32), qtype)
        assert np.array_equal(quants.decode(real[3:7], qtype), gguf.quants.dequantize(real[3:7], qtype))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    finite = np.isfinite(ref)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert np.array_equal(ours[finite].view(np.uint32), ref[finite].view(np.uint32))


def planted(rows: int = 64, cols: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[0, :64] = 0
    x[1] = 0.37
    x[2, :32] *= 1e4
    x[3, :48] *= 1e-6
    x[4, 32:64] = 1e-41
    x[5] = 0
    x[5, 7] = -3.0
    x[6, :16] = -np.abs(x[6, :16])
    x[7, :256] = 6e-8
    x[8] *= 1e3
    x[9] = -1e-7
    x[10, ::2] = 0
    x[11] = np.float32(65519) * np.sign(x[11])
    x[12, :256] = np.linspace(-1, 1, 256, dtype=np.float32)
    return x


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0])
def test_compiled_encoders_match_the_numpy_fallback(qtype, monkeypatch):
    x = planted()
    compiled = quants.encode(x, qtype)
    monkeypatch.setattr(quants, "_JIT", None)
    with np.errstate(all="ignore"):
        fallback = quants.encode(x, qtype)
    assert compiled.shape == fallback.shape
    assert np.array_equal(compiled, fallback), np.nonzero((compiled != fallback).any(axis=1))[0][:10]
