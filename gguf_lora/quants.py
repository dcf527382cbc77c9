"""Encoding float32 tensors into GGUF types, byte for byte as llama.cpp's reference kernels
(ggml/src/ggml-quants.c, quantize_row_*_ref) write them.

F32/F16/BF16 and the 32-block types come from gguf-py (bit-exact ports of the reference kernels); Q8_0 and
the K-quants are written here twice: compiled whole with numba (kquant_jit.py, used when numba imports)
and vectorised with numpy over all blocks of a tensor (the fallback). ggml-base is compiled without FMA
contraction or fast-math, so evaluating each float32 operation in the reference's order reproduces its
bytes; the tests compare both versions with llama-quantize.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import gguf
import numpy as np

from . import finite

Q = gguf.GGMLQuantizationType
QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)


def block_size(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def byte_shape(shape: tuple[int, ...], qtype: Q) -> tuple[int, ...]:
    return gguf.quants.quant_shape_to_byte_shape(shape, qtype)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even via the 1.5*2^23 trick (valid for |x| < 2^22)."""
    val = (x.astype(np.float32) + np.float32(12582912.0)).view(np.int32)
    return (val & 0x007FFFFF) - 0x00400000


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for many groups at once: x is (groups, n)."""
    x = x.astype(np.float32)
    n = x.shape[1]
    ax = np.abs(x)
    imax = np.argmax(ax, axis=1)  # first index of the maximum, like the strict '>' scan
    amax = ax[np.arange(len(x)), imax]
    vmax = x[np.arange(len(x)), imax]
    tiny = amax < GROUP_MAX_EPS
    safe_max = np.where(tiny, np.float32(1), vmax).astype(np.float32)
    w = x * x

    def attempt(iscale):
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        sumlx = np.zeros(len(x), np.float32)
        suml2 = np.zeros(len(x), np.float32)
        lf = l.astype(np.float32)
        for i in range(n):  # sequential float32 sums, as the C loop
            sumlx = sumlx + w[:, i] * x[:, i] * lf[:, i]
            suml2 = suml2 + w[:, i] * lf[:, i] * lf[:, i]
        return l, sumlx, suml2

    iscale = (np.float32(-nmax) / safe_max).astype(np.float32)
    L, sumlx, suml2 = attempt(iscale)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, np.float32(1)), np.float32(0)).astype(np.float32)
    best = (scale * sumlx).astype(np.float32)
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = (-(np.float32(nmax) + np.float32(0.1) * np.float32(is_)) / safe_max).astype(np.float32)
        l, sx, s2 = attempt(iscale)
        better = (s2 > 0) & (sx * sx > best * s2)
        L = np.where(better[:, None], l, L)
        new_scale = (sx / np.where(s2 > 0, s2, np.float32(1))).astype(np.float32)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, (new_scale * sx).astype(np.float32), best)
    L = np.where(tiny[:, None], 0, L + nmax)
    scale = np.where(tiny, np.float32(0), scale)
    return scale.astype(np.float32), L.astype(np.int32)


def _seq_sum(v: np.ndarray) -> np.ndarray:
    """Sum over the first axis one element at a time in float32, as a C loop does (v is (n, groups)).

    numpy reduces the outer axis of a C-contiguous array row by row (out += v[i]), never pairwise, so
    this is the C loop's order; the byte-identity tests pin it."""
    return np.add.reduce(np.ascontiguousarray(v, dtype=np.float32), axis=0)


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int, use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad) for many
    groups at once; x and w are (n, groups). Returns (scale, the_min, L (n, groups))."""
    err = (lambda d: np.abs(d)) if use_mad else (lambda d: d * d)  # noqa: E731
    f32 = np.float32
    mn = np.minimum(x.min(axis=0), f32(0))
    mx = x.max(axis=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = mx == mn
    one = lambda a: np.where(flat, f32(1), a)  # noqa: E731  (flat groups are answered at the end)
    iscale = (f32(nmax) / one(mx - mn)).astype(f32)
    scale = (f32(1) / iscale).astype(f32)
    L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
    diff = scale * L.astype(f32) + mn - x
    best = _seq_sum(w * err(diff))
    for step in range(nstep + 1):
        iscale = ((f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / one(mx - mn)).astype(f32)
        laux = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
        lf = laux.astype(f32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lf), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        safe_d = np.where(ok, D, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_d
        clamp = this_min > 0
        this_min = np.where(clamp, f32(0), this_min)
        this_scale = np.where(clamp, sum_xl / np.where(sum_l2 != 0, sum_l2, f32(1)), this_scale)
        diff = this_scale * lf + this_min - x
        cur = _seq_sum(w * err(diff))
        better = ok & (cur < best) & ~flat
        L = np.where(better, laux, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, f32(0), scale)
    return scale.astype(f32), (-mn).astype(f32), L


_UNSET = object()
_JIT = _UNSET  # the compiled search loops, imported on first K-quant use (numba costs ~0.5 s to import)


def _jit():
    """kquant_jit, or None where numba cannot be imported: the numpy loops here are the fallback."""
    global _JIT
    if _JIT is _UNSET:
        try:
            from . import kquant_jit
        except ImportError:
            kquant_jit = None
        _JIT = kquant_jit
    return _JIT


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, nstep: int, use_mad: bool = False):
    """make_qkx2_quants over groups: x, w are (groups, n); returns (scales, mins, L (groups, n))."""
    jit = _jit()
    if jit is not None:
        scales = np.empty(len(x), np.float32)
        mins = np.empty(len(x), np.float32)
        L = np.empty(x.shape, np.int32)
        jit.qkx2_groups(np.ascontiguousarray(x), np.ascontiguousarray(w), nmax, np.float32(rmin), np.float32(0.1),
                         nstep, use_mad, scales, mins, L)
        return scales, mins, L
    scales, mins, L = _make_qkx2_quants(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), nmax, rmin, 0.1, nstep,
                                        use_mad)
    return scales, mins, L.T


def _quantize_k_scaled(rows: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The shared front half of quantize_row_q4_K_ref / q5_K_ref: 8 sub-blocks of 32 per 256-block, each
    with a scale and a min, both quantized to 6 bits against the block's largest."""
    f32 = np.float32
    x = rows.astype(f32).reshape(-1, 8, 32)
    nb = len(x)
    groups = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_seq_sum(np.ascontiguousarray((groups * groups).T)) / f32(32)).astype(f32)
    scales, mins, L = _qkx2(groups, av_x[:, None] + np.abs(groups), nmax, rmin, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0)).astype(f32)
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0)).astype(f32)
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4]
    packed[:, 4:8] = lm[:, :4]
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    packed[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    packed[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    d16 = (max_scale / f32(63)).astype(np.float16)
    dmin16 = (max_min / f32(63)).astype(np.float16)
    d = (d16.astype(f32)[:, None] * ls.astype(f32)).astype(f32)
    dm = (dmin16.astype(f32)[:, None] * lm.astype(f32)).astype(f32)
    safe = np.where(d == 0, f32(1), d)
    requant = np.clip(_nearest_int((x + dm[:, :, None]) / safe[:, :, None]), 0, nmax)
    L = np.where((d == 0)[:, :, None], L, requant).astype(np.uint8).reshape(nb, 256)
    head = np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2), packed], axis=1)
    return head, L


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: 144 bytes per 256 values (d, dmin, 12 scale bytes, 128 nibble bytes)."""
    head, L = _quantize_k_scaled(rows, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32)  # 4 chunks of 64: low nibble from the first 32, high from the next 32
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(len(L), 128)
    return np.concatenate([head, qs], axis=1).reshape(rows.shape[0], -1)


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref: 176 bytes per 256 values (d, dmin, 12 scale bytes, 32 high-bit bytes, 128)."""
    head, L = _quantize_k_scaled(rows, 31, -0.5, 15)
    L = L.reshape(-1, 4, 2, 32)
    hi = L >> 4  # the fifth bit of each value
    qh = np.zeros((len(L), 32), np.uint8)
    for k in range(4):
        qh |= (hi[:, k, 0, :] << (2 * k)) | (hi[:, k, 1, :] << (2 * k + 1))
    lo = L & 0xF
    ql = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(len(L), 128)
    return np.concatenate([head, qh, ql], axis=1).reshape(rows.shape[0], -1)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs of Q2_K / Q3_K: per 128 values, byte l holds values l, l+32, l+64, l+96 in 2-bit fields."""
    L = L.reshape(len(L), 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(len(L), 64)


def quantize_q2_k(rows: np.ndarray) -> np.ndarray:
    """quantize_row_q2_K_ref: 84 bytes per 256 values (16 scale/min bytes, 64 quant bytes, d, dmin)."""
    f32 = np.float32
    x = rows.astype(f32).reshape(-1, 16, 16)
    nb = len(x)
    groups = x.reshape(nb * 16, 16)
    scales, mins, L = _qkx2(groups, np.abs(groups), 3, -0.5, 15, use_mad=True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    has_s, has_m = max_scale > 0, max_min > 0
    q4 = f32(15)
    iscale = (q4 / np.where(has_s, max_scale, f32(1))).astype(f32)
    sc = np.where(has_s[:, None], _nearest_int(iscale[:, None] * scales) & 0xFF, 0)
    d16 = np.where(has_s, max_scale / q4, f32(0)).astype(np.float16)
    imin = (q4 / np.where(has_m, max_min, f32(1))).astype(f32)
    sc = np.where(has_m[:, None], sc | ((_nearest_int(imin[:, None] * mins) << 4) & 0xFF), sc).astype(np.uint8)
    dmin16 = np.where(has_m, max_min / q4, f32(0)).astype(np.float16)
    d = (d16.astype(f32)[:, None] * (sc & 0xF).astype(f32)).astype(f32)
    dm = (dmin16.astype(f32)[:, None] * (sc >> 4).astype(f32)).astype(f32)
    safe = np.where(d == 0, f32(1), d)
    requant = np.clip(_nearest_int((x + dm[:, :, None]) / safe[:, :, None]), 0, 3)
    L = np.where((d == 0)[:, :, None], L, requant).astype(np.uint8).reshape(nb, 256)
    return np.concatenate([sc, _pack_2bit(L), d16.view(np.uint8).reshape(nb, 2),
                           dmin16.view(np.uint8).reshape(nb, 2)], axis=1).reshape(rows.shape[0], -1)


def _make_q3_quants_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) for many groups; x is (n, groups). Returns (scale, L+nmax)."""
    f32 = np.float32
    n, G = x.shape
    ax = np.abs(x)
    imax = np.argmax(ax, axis=0)
    amax = ax[imax, np.arange(G)]
    vmax = x[imax, np.arange(G)]
    tiny = amax < GROUP_MAX_EPS
    iscale = (f32(-nmax) / np.where(tiny, f32(1), vmax)).astype(f32)
    L = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    sumlx = np.zeros(G, f32)
    suml2 = np.zeros(G, f32)
    for i in range(n):
        li = L[i].astype(f32)
        sumlx = sumlx + w[i] * x[i] * li
        suml2 = suml2 + w[i] * li * li
    for _ in range(5):  # a group whose pass changed nothing would change nothing again: no early exit needed
        for i in range(n):
            li = L[i].astype(f32)
            slx = sumlx - w[i] * x[i] * li
            pos = slx > 0
            sl2 = suml2 - w[i] * li * li
            new_l = np.clip(_nearest_int(x[i] * sl2 / np.where(pos, slx, f32(1))), -nmax, nmax - 1)
            nl = new_l.astype(f32)
            slx2 = slx + w[i] * x[i] * nl
            sl22 = sl2 + w[i] * nl * nl
            take = pos & (new_l != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22) & ~tiny
            L[i] = np.where(take, new_l, L[i])
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0)).astype(f32)
    return np.where(tiny, f32(0), scale), np.where(tiny[None, :], 0, L + nmax)


def quantize_q3_k(rows: np.ndarray) -> np.ndarray:
    """quantize_row_q3_K_ref: 110 bytes per 256 values (32 high-bit bytes, 64 quant bytes, 12 scale bytes, d)."""
    f32 = np.float32
    x = rows.astype(f32).reshape(-1, 16, 16)
    nb = len(x)
    xt = np.ascontiguousarray(x.reshape(nb * 16, 16).T)
    scales, L = _make_q3_quants_rmse(xt, 4)
    scales, L = scales.reshape(nb, 16), L.T.reshape(nb, 16, 16)
    absval = np.abs(scales)
    j = np.argmax(absval, axis=1)
    max_scale = np.where(absval[np.arange(nb), j] > 0, scales[np.arange(nb), j], f32(0))
    has = max_scale != 0
    iscale = (f32(-32) / np.where(has, max_scale, f32(1))).astype(f32)
    lq = (np.clip(_nearest_int(iscale[:, None] * scales), -32, 31) + 32).astype(np.uint8)  # 0..63
    lq = np.where(has[:, None], lq, 0).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, :8] = (lq[:, :8] & 0xF) | ((lq[:, 8:] & 0xF) << 4)
    hi = lq >> 4
    for k in range(4):  # scales[8 + j%4] gets bits 2*(j//4) from j = k, k+4, k+8, k+12
        packed[:, 8 + k] = hi[:, k] | (hi[:, k + 4] << 2) | (hi[:, k + 8] << 4) | (hi[:, k + 12] << 6)
    packed = np.where(has[:, None], packed, 0).astype(np.uint8)
    d16 = np.where(has, f32(1) / iscale, f32(0)).astype(np.float16)
    sc = lq.astype(np.int32) - 32
    d = (d16.astype(f32)[:, None] * sc.astype(f32)).astype(f32)
    safe = np.where(d == 0, f32(1), d)
    requant = np.clip(_nearest_int(x / safe[:, :, None]), -4, 3) + 4
    L = np.where((d == 0)[:, :, None], L, requant).astype(np.uint8).reshape(nb, 256)
    high = (L > 3).reshape(nb, 8, 32)  # value j: byte j % 32, bit j // 32
    hmask = np.zeros((nb, 32), np.uint8)
    for bit in range(8):
        hmask |= high[:, bit].astype(np.uint8) << bit
    L = np.where(L > 3, L - 4, L).astype(np.uint8)
    return np.concatenate([hmask, _pack_2bit(L), packed, d16.view(np.uint8).reshape(nb, 2)],
                          axis=1).reshape(rows.shape[0], -1)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref over every 256-block of a (rows, n) float32 array -> (rows, n/256*210) bytes."""
    x = rows.astype(np.float32).reshape(-1, QK_K)
    nb = len(x)
    groups = x.reshape(nb * 16, 16)
    jit = _jit()
    if jit is not None:
        scales, L = np.empty(len(groups), np.float32), np.empty(groups.shape, np.int32)
        jit.qx_rmse1_groups(np.ascontiguousarray(groups), 32, scales, L)
    else:
        scales, L = _make_qx_quants_rmse1(groups, 32)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    abs_s = np.abs(scales)
    ib = np.argmax(abs_s, axis=1)
    max_abs = abs_s[np.arange(nb), ib]
    max_scale = scales[np.arange(nb), ib]
    zero = max_abs < GROUP_MAX_EPS
    iscale = (np.float32(-128.0) / np.where(zero, np.float32(1), max_scale)).astype(np.float32)
    d16 = (np.float32(1) / iscale).astype(np.float16)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d = (d16.astype(np.float32)[:, None] * sc.astype(np.float32)).astype(np.float32)  # (nb, 16)
    safe_d = np.where(d == 0, np.float32(1), d)
    l = np.clip(_nearest_int(x.reshape(nb, 16, 16) / safe_d[:, :, None]), -32, 31) + 32
    L = np.where((d == 0)[:, :, None], L, l).reshape(nb, QK_K).astype(np.uint8)
    # pack: ql (128 bytes) low nibbles, qh (64 bytes) high 2 bits, as in the reference loop
    L = L.reshape(nb, 2, 4, 32)  # halves of 128: [l, l+32, l+64, l+96]
    q1, q2, q3, q4 = (L[:, :, k, :] for k in range(4))
    ql = np.concatenate([(q1 & 0xF) | ((q3 & 0xF) << 4), (q2 & 0xF) | ((q4 & 0xF) << 4)], axis=2)  # (nb,2,64)
    qh = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)  # (nb,2,32)
    out = np.concatenate([ql.reshape(nb, 128).astype(np.uint8), qh.reshape(nb, 64).astype(np.uint8),
                          sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0
    return out.reshape(rows.shape[0], -1)


_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])


def quantize_q8_0(rows: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref: d = amax/127, q = roundf(x/d) (half away from zero), in fewer passes than
    gguf-py (a block maximum by reduceat, not a reduction along a 32-wide axis)."""
    x = rows.reshape(-1, 32)
    ax = np.abs(x).reshape(-1)
    d = np.maximum.reduceat(ax, np.arange(0, ax.size, 32)) / np.float32(127)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    q = x * inv[:, None]
    r = np.rint(q)  # half to even; ties are then pushed away from zero like C's roundf
    ties = np.abs(q - r) == np.float32(0.5)
    if ties.any():
        r[ties] = np.trunc(q[ties]) + np.sign(q[ties])
    out = np.empty(len(x), _Q8_0)
    out["d"] = d
    out["qs"] = r
    return out.view(np.uint8).reshape(rows.shape[0], -1)


_KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)  # E2M1, doubled
_LIBM: object = _UNSET


def _libm_log2f():
    """libm's own log2f (what ggml calls), for the few values where its rounding decides; None off glibc."""
    global _LIBM
    if _LIBM is _UNSET:
        import ctypes
        import ctypes.util

        try:
            fn = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6").log2f
            fn.argtypes, fn.restype = [ctypes.c_float], ctypes.c_float
            _LIBM = fn
        except (OSError, AttributeError):
            _LIBM = None
    return _LIBM


def _floor_log2f(amax: np.ndarray) -> np.ndarray:
    """floorf(log2f(amax)) for positive float32 amax, as ggml evaluates it. log2f rounds to float32, so an
    amax just below a power of two can give that power's exponent (log2f(7.9999995f) == 3.0f). The exact
    floor comes from frexp; log2 rounded to float32 decides the rest, and for amax within 2^-16 below a
    power of two (where a libm's last-bit error could flip it) libm's log2f itself is asked."""
    mant, exp = np.frexp(amax)  # amax = mant * 2**exp, mant in [0.5, 1)
    out = (exp - 1).astype(np.int64)
    rounded = np.log2(amax.astype(np.float64)).astype(np.float32)
    out = np.where(rounded >= exp, exp, out)
    near = np.flatnonzero(mant > np.float32(1 - 2 ** -16))
    log2f = _libm_log2f() if near.size else None
    if log2f is not None:
        flat, values = out.reshape(-1), amax.reshape(-1)
        for i in near:
            flat[i] = int(np.floor(np.float32(log2f(float(values[i])))))
    return out


def quantize_mxfp4(rows: np.ndarray) -> np.ndarray:
    """quantize_row_mxfp4_ref: per 32 values an E8M0 exponent e = floor(log2(amax)) - 2 + 127 (stored as
    the low byte of the C int conversion, as gcc compiles the uint8_t cast) and 16 bytes of nibbles (value j
    in the low nibble of byte j, value j+16 in the high one), each the first of the 16 E2M1 levels times
    2^(e-128) nearest to the value (strict <, in float32, as the C loop)."""
    x = rows.astype(np.float32).reshape(-1, 32)
    amax = np.abs(x).max(axis=1)
    positive = amax > 0
    e = np.zeros(len(x), np.int64)
    if positive.any():
        e[positive] = _floor_log2f(amax[positive]) - 2 + 127
    e = (e & 0xFF).astype(np.uint32)
    d = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32).view(np.float32)
    d = d[:, None]
    best = np.zeros(x.shape, np.uint8)
    best_err = np.abs(_KVALUES_MXFP4[0] * d - x)
    for i in range(1, 16):
        err = np.abs(_KVALUES_MXFP4[i] * d - x)
        better = err < best_err
        best[better] = i
        best_err = np.where(better, err, best_err)
    qs = best[:, :16] | (best[:, 16:] << 4)
    return np.concatenate([e.astype(np.uint8)[:, None], qs], axis=1).reshape(rows.shape[0], -1)


_POOL: ThreadPoolExecutor | None = None
_CHUNK = 1 << 20  # elements per work item: small enough to stay in cache, big enough to release the GIL well
_CHUNK_K = 1 << 18  # the K-quant searches keep a dozen temporaries per element: smaller slices stay in L2


def _encode_rows(rows: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return rows
    if qtype == Q.F16:
        return rows.astype(np.float16)
    # The reference kernels divide by block scales that may be 0 or subnormal (1/d overflows to inf) and cast
    # what follows, as C does without a word; the bytes match llama-quantize's, so numpy's warnings are noise.
    with np.errstate(all="ignore"):
        if qtype == Q.Q8_0:
            return quantize_q8_0(rows)
        if qtype == Q.MXFP4:  # huge blocks: k * 2^127 overflows to inf, as in C
            return quantize_mxfp4(rows)
        if qtype in _K_QUANTS:
            return _K_QUANTS[qtype](rows)
        return gguf.quants.quantize(rows, qtype)


def _encode_into(rows: np.ndarray, qtype: Q, out: np.ndarray) -> None:
    """Encode float32 rows (n, cols) into out (n, bytes per row): the compiled kernel where there is one
    (it writes into out directly, GIL released), else the numpy encoders."""
    jit = _jit() if qtype in _JIT_KERNELS else None
    if jit is not None:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        x = rows.reshape(-1, block)
        y = out.reshape(-1, size)
        if qtype == Q.Q8_0:
            jit.q8_0_rows(x, y)
        else:
            getattr(jit, _JIT_KERNELS[qtype])(x, y, jit.F16_TO_F32)
    elif qtype == Q.F16:
        with np.errstate(over="ignore"):  # values beyond F16 become Inf here; finite.check reports them
            out.view(np.float16)[...] = rows
    else:
        out[...] = _encode_rows(rows, qtype).view(np.uint8).reshape(out.shape)


def encode_rows(shape: tuple[int, ...], qtype: Q, rows: Callable[[slice], np.ndarray]) -> np.ndarray:
    """Encode a tensor produced a slice of rows at a time: rows(slice) returns those rows as float32.

    Slices are spread over a thread pool (numpy and the compiled kernels release the GIL, so both cores
    work), sized to stay in cache, and encoded straight into their place in the result. Every row is
    encoded independently of the others, so the bytes do not depend on the split."""
    global _POOL
    n_cols = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, (_CHUNK_K if qtype in _K_QUANTS else _CHUNK) // n_cols)
    out = np.empty((n_rows, byte_shape((n_cols,), qtype)[-1]), np.uint8)

    def one(i: int) -> None:
        sl = slice(i, min(i + step, n_rows))
        block = np.ascontiguousarray(rows(sl), dtype=np.float32)
        _encode_into(block.reshape(-1, n_cols), qtype, out[sl])
        finite.check(out[sl], qtype, block)  # after the conversion: a finite float32 can overflow the type

    if n_rows <= step:
        one(0)
    else:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="gguf-lora-quant")
        for _ in _POOL.map(one, range(0, n_rows, step)):
            pass
    return out.reshape(byte_shape(shape, qtype))


def encode(arr: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 array -> the type's bytes as a (rows, bytes per row) uint8 array."""
    arr = np.asarray(arr, dtype=np.float32)
    flat = arr.reshape(-1, arr.shape[-1])
    return encode_rows(arr.shape, qtype, lambda sl: flat[sl])


def decode(data: np.ndarray, qtype: Q) -> np.ndarray:
    """A tensor's bytes (or some of its rows) -> float32 values, as gguf-py's dequantize gives them; the
    common quantized types of a base through the compiled kernels (same floats, without numpy's temporaries)."""
    kernel = _DECODE_KERNELS.get(qtype)
    jit = _jit() if kernel else None
    if jit is None or data.dtype != np.uint8:
        return gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = np.ascontiguousarray(data)
    out = np.empty((*rows.shape[:-1], rows.shape[-1] // size * block), np.float32)
    getattr(jit, kernel)(rows.reshape(-1, size), out.reshape(-1, block), jit.F16_TO_F32)
    return out


_K_QUANTS = {Q.Q2_K: quantize_q2_k, Q.Q3_K: quantize_q3_k, Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k,
             Q.Q6_K: quantize_q6_k}
_DECODE_KERNELS = {Q.Q4_K: "dq_q4_k_rows", Q.Q6_K: "dq_q6_k_rows", Q.Q8_0: "dq_q8_0_rows"}
_JIT_KERNELS = {Q.Q8_0: "q8_0_rows", Q.Q4_K: "q4_k_rows", Q.Q5_K: "q5_k_rows", Q.Q6_K: "q6_k_rows"}
WRITABLE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.MXFP4, *_K_QUANTS})
