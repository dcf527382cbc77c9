"""The reference quantization kernels of ggml-quants.c compiled with numba: quantize_row_q4_K_ref, _q5_K_ref,
_q6_K_ref and _q8_0_ref whole (search loops, scale packing, fp16 rounding, bit packing), and the search
loops make_qkx2_quants / make_qx_quants on their own. The C written out line by line, float32 throughout
(every operation cast back to float32, no fast-math, hence no FMA contraction: ggml-base's arithmetic).
Every kernel releases the GIL and writes into a caller's array, so quants.encode_rows keeps both cores busy
with no Python between the blocks of a slice. The numpy version in quants.py stays as the fallback where
numba cannot be imported; tests check both, byte for byte, against llama-quantize.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_MAGIC = np.float32(12582912.0)  # nearest_int: 1.5 * 2^23
_TO_INF = np.float32(2.0 ** 112)  # fp16_ieee_from_fp32_value's scales
_TO_ZERO = np.float32(2.0 ** -110)
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # GGML_FP16_TO_FP32
_LANES = 32  # groups searched side by side: enough for LLVM to vectorise the loops over them
f32 = np.float32
jit = njit(cache=True, nogil=True, error_model="numpy")  # IEEE division (inf, NaN), as C; no ZeroDivisionError


@intrinsic
def _as_int(typingctx, f):
    """The bits of a float32 as an int32 (C's memcpy), in a register: vectorisable, unlike a store and a load."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _as_float(typingctx, i):
    """An int32's bits as a float32."""
    if i != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, nogil=True, inline="always")
def nearest_int(f):
    """ggml's nearest_int, bit for bit (out of its asserted range too: NaN, inf, huge values)."""
    return (_as_int(np.float32(f + _MAGIC)) & 0x007FFFFF) - 0x00400000


@jit
def f16_bits(f):
    """GGML_FP32_TO_FP16 (the FP16 library's fp16_ieee_from_fp32_value): round to nearest even, as bits."""
    base = f32(f32(f32(abs(f)) * _TO_INF) * _TO_ZERO)
    w = np.int64(_as_int(f)) & 0xFFFFFFFF
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = f32(_as_float(np.int32((bias >> 1) + 0x07800000)) + base)
    bits = np.int64(_as_int(base)) & 0xFFFFFFFF
    nonsign = ((bits >> 13) & 0x00007C00) + (bits & 0x00000FFF)
    return (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)


@jit
def f16_bits_array(x, out):
    """f16_bits over an array (for the tests: it must agree with numpy's float16 conversion)."""
    for i in range(x.size):
        out[i] = f16_bits(x[i])


@jit
def qkx2_one(xg, wg, lg, laux, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants for one group: levels -> lg; returns (scale, the_min)."""
    n = xg.shape[0]
    mn = xg[0]
    mx = xg[0]
    sum_w = wg[0]
    sum_x = np.float32(sum_w * xg[0])
    for i in range(1, n):
        if xg[i] < mn:
            mn = xg[i]
        if xg[i] > mx:
            mx = xg[i]
        sum_w = np.float32(sum_w + wg[i])
        sum_x = np.float32(sum_x + np.float32(wg[i] * xg[i]))
    if mn > 0:
        mn = np.float32(0)
    if mx == mn:
        for i in range(n):
            lg[i] = 0
        return np.float32(0), -mn
    iscale = np.float32(np.float32(nmax) / np.float32(mx - mn))
    scale = np.float32(np.float32(1) / iscale)
    best = np.float32(0)
    for i in range(n):
        q = max(0, min(nmax, nearest_int(np.float32(iscale * np.float32(xg[i] - mn)))))
        lg[i] = q
        diff = np.float32(np.float32(np.float32(scale * np.float32(q)) + mn) - xg[i])
        diff = abs(diff) if use_mad else np.float32(diff * diff)
        best = np.float32(best + np.float32(wg[i] * diff))
    for step in range(nstep + 1):
        iscale = np.float32(np.float32(np.float32(rmin + np.float32(rdelta * np.float32(step))) + np.float32(nmax))
                            / np.float32(mx - mn))
        sum_l = np.float32(0)
        sum_l2 = np.float32(0)
        sum_xl = np.float32(0)
        for i in range(n):
            q = max(0, min(nmax, nearest_int(np.float32(iscale * np.float32(xg[i] - mn)))))
            laux[i] = q
            wl = np.float32(wg[i] * np.float32(q))
            sum_l = np.float32(sum_l + wl)
            sum_l2 = np.float32(sum_l2 + np.float32(wl * np.float32(q)))
            sum_xl = np.float32(sum_xl + np.float32(wl * xg[i]))
        D = np.float32(np.float32(sum_w * sum_l2) - np.float32(sum_l * sum_l))
        if D > 0:
            this_scale = np.float32(np.float32(np.float32(sum_w * sum_xl) - np.float32(sum_x * sum_l)) / D)
            this_min = np.float32(np.float32(np.float32(sum_l2 * sum_x) - np.float32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = np.float32(0)
                this_scale = np.float32(sum_xl / sum_l2)
            cur = np.float32(0)
            for i in range(n):
                diff = np.float32(np.float32(np.float32(this_scale * np.float32(laux[i])) + this_min) - xg[i])
                diff = abs(diff) if use_mad else np.float32(diff * diff)
                cur = np.float32(cur + np.float32(wg[i] * diff))
            if cur < best:
                for i in range(n):
                    lg[i] = laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@jit
def qkx2_groups(x, w, nmax, rmin, rdelta, nstep, use_mad, scales, mins, L):
    """make_qkx2_quants for every row of x (groups, n): scale -> scales, the_min -> mins, levels -> L."""
    laux = np.empty(x.shape[1], np.int32)
    for g in range(x.shape[0]):
        scales[g], mins[g] = qkx2_one(x[g], w[g], L[g], laux, nmax, rmin, rdelta, nstep, use_mad)


@jit
def qx_rmse1_one(xg, nmax, lg):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for one group: L + nmax -> lg; returns the scale."""
    n = xg.shape[0]
    vmax = np.float32(0)
    amax = np.float32(0)
    for i in range(n):
        ax = abs(xg[i])
        if ax > amax:
            amax = ax
            vmax = xg[i]
    if amax < _EPS:
        for i in range(n):
            lg[i] = 0
        return np.float32(0)
    iscale = np.float32(np.float32(-nmax) / vmax)
    sumlx = np.float32(0)
    suml2 = np.float32(0)
    for i in range(n):
        q = max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * xg[i]))))
        lg[i] = q + nmax
        w = np.float32(xg[i] * xg[i])
        sumlx = np.float32(sumlx + np.float32(np.float32(w * xg[i]) * np.float32(q)))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * np.float32(q)) * np.float32(q)))
    scale = np.float32(sumlx / suml2) if suml2 != 0 else np.float32(0)
    best = np.float32(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = np.float32(-np.float32(np.float32(nmax) + np.float32(np.float32(0.1) * np.float32(step))) / vmax)
        sumlx = np.float32(0)
        suml2 = np.float32(0)
        for i in range(n):
            q = max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * xg[i]))))
            w = np.float32(xg[i] * xg[i])
            sumlx = np.float32(sumlx + np.float32(np.float32(w * xg[i]) * np.float32(q)))
            suml2 = np.float32(suml2 + np.float32(np.float32(w * np.float32(q)) * np.float32(q)))
        if suml2 > 0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            for i in range(n):
                lg[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * xg[i]))))
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    return scale


@jit
def qx_rmse1_groups(x, nmax, scales, L):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for every row of x (groups, n)."""
    for g in range(x.shape[0]):
        scales[g] = qx_rmse1_one(x[g], nmax, L[g])


@jit
def qkx2_lanes(G, xt, wt, L, laux, nmax, rmin, rdelta, nstep, st, flat, better):
    """make_qkx2_quants (use_mad=false) for G groups side by side: xt, wt are (n, G), one group per column.
    Each group's float32 operations run in the C's order; only the groups are interleaved, so that LLVM
    vectorises the loops over them (the C runs one group at a time). The arrays are C-contiguous and as
    wide as _LANES (a column slice would hide the unit stride from LLVM); the first G columns are used.
    Results: levels -> L, scale -> st[5], the_min -> st[0] (negated below), as in qkx2_one, whose branches
    become masks here."""
    n = xt.shape[0]
    mn, mx, sum_w, sum_x, best, scale, iscale = st[0], st[1], st[2], st[3], st[4], st[5], st[6]
    sum_l, sum_l2, sum_xl, t_scale, t_min, cur = st[7], st[8], st[9], st[10], st[11], st[12]
    for g in range(G):
        mn[g] = xt[0, g]
        mx[g] = xt[0, g]
        sum_w[g] = wt[0, g]
        sum_x[g] = f32(wt[0, g] * xt[0, g])
    for i in range(1, n):
        for g in range(G):
            v = xt[i, g]
            mn[g] = v if v < mn[g] else mn[g]
            mx[g] = v if v > mx[g] else mx[g]
            sum_w[g] = f32(sum_w[g] + wt[i, g])
            sum_x[g] = f32(sum_x[g] + f32(wt[i, g] * v))
    for g in range(G):
        mn[g] = f32(0) if mn[g] > 0 else mn[g]
        flat[g] = mx[g] == mn[g]  # answered at the end; its lanes compute harmless NaNs meanwhile
        iscale[g] = f32(f32(nmax) / f32(mx[g] - mn[g]))
        scale[g] = f32(f32(1) / iscale[g])
        best[g] = f32(0)
    for i in range(n):
        for g in range(G):
            q = max(0, min(nmax, nearest_int(f32(iscale[g] * f32(xt[i, g] - mn[g])))))
            L[i, g] = q
            diff = f32(f32(f32(scale[g] * f32(q)) + mn[g]) - xt[i, g])
            best[g] = f32(best[g] + f32(wt[i, g] * f32(diff * diff)))
    for step in range(nstep + 1):
        num = f32(f32(rmin + f32(rdelta * f32(step))) + f32(nmax))
        for g in range(G):
            iscale[g] = f32(num / f32(mx[g] - mn[g]))
            sum_l[g] = f32(0)
            sum_l2[g] = f32(0)
            sum_xl[g] = f32(0)
        for i in range(n):
            for g in range(G):
                q = max(0, min(nmax, nearest_int(f32(iscale[g] * f32(xt[i, g] - mn[g])))))
                laux[i, g] = q
                wl = f32(wt[i, g] * f32(q))
                sum_l[g] = f32(sum_l[g] + wl)
                sum_l2[g] = f32(sum_l2[g] + f32(wl * f32(q)))
                sum_xl[g] = f32(sum_xl[g] + f32(wl * xt[i, g]))
        for g in range(G):
            D = f32(f32(sum_w[g] * sum_l2[g]) - f32(sum_l[g] * sum_l[g]))
            this_scale = f32(f32(f32(sum_w[g] * sum_xl[g]) - f32(sum_x[g] * sum_l[g])) / D)
            this_min = f32(f32(f32(sum_l2[g] * sum_x[g]) - f32(sum_l[g] * sum_xl[g])) / D)
            clamp = this_min > 0
            t_scale[g] = f32(sum_xl[g] / sum_l2[g]) if clamp else this_scale
            t_min[g] = f32(0) if clamp else this_min
            cur[g] = f32(0)
            better[g] = D > 0
        for i in range(n):
            for g in range(G):
                diff = f32(f32(f32(t_scale[g] * f32(laux[i, g])) + t_min[g]) - xt[i, g])
                cur[g] = f32(cur[g] + f32(wt[i, g] * f32(diff * diff)))
        for g in range(G):
            b = better[g] and cur[g] < best[g] and not flat[g]
            better[g] = b
            best[g] = cur[g] if b else best[g]
            scale[g] = t_scale[g] if b else scale[g]
            mn[g] = t_min[g] if b else mn[g]
        for i in range(n):
            for g in range(G):
                L[i, g] = laux[i, g] if better[g] else L[i, g]
    for g in range(G):
        if flat[g]:
            scale[g] = f32(0)
            for i in range(n):
                L[i, g] = 0


@jit
def qx_rmse1_lanes(G, xt, nmax, L, laux, st, tiny, better):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for G groups side by side (see qkx2_lanes):
    L + nmax -> L, scale -> st[0]."""
    n = xt.shape[0]
    scale, amax, vmax, iscale, sumlx, suml2, best = st[0], st[1], st[2], st[3], st[4], st[5], st[6]
    for g in range(G):
        amax[g] = f32(0)
        vmax[g] = f32(0)
    for i in range(n):
        for g in range(G):
            ax = abs(xt[i, g])
            b = ax > amax[g]
            vmax[g] = xt[i, g] if b else vmax[g]
            amax[g] = ax if b else amax[g]
    for g in range(G):
        tiny[g] = amax[g] < _EPS
        iscale[g] = f32(f32(-nmax) / vmax[g])
        sumlx[g] = f32(0)
        suml2[g] = f32(0)
    for i in range(n):
        for g in range(G):
            x = xt[i, g]
            q = max(-nmax, min(nmax - 1, nearest_int(f32(iscale[g] * x))))
            L[i, g] = q + nmax
            w = f32(x * x)
            sumlx[g] = f32(sumlx[g] + f32(f32(w * x) * f32(q)))
            suml2[g] = f32(suml2[g] + f32(f32(w * f32(q)) * f32(q)))
    for g in range(G):
        scale[g] = f32(sumlx[g] / suml2[g]) if suml2[g] != 0 else f32(0)
        best[g] = f32(scale[g] * sumlx[g])
    for step in range(-9, 10):
        if step == 0:
            continue
        num = f32(-f32(f32(nmax) + f32(f32(0.1) * f32(step))))
        for g in range(G):
            iscale[g] = f32(num / vmax[g])
            sumlx[g] = f32(0)
            suml2[g] = f32(0)
        for i in range(n):
            for g in range(G):
                x = xt[i, g]
                q = max(-nmax, min(nmax - 1, nearest_int(f32(iscale[g] * x))))
                laux[i, g] = q + nmax
                w = f32(x * x)
                sumlx[g] = f32(sumlx[g] + f32(f32(w * x) * f32(q)))
                suml2[g] = f32(suml2[g] + f32(f32(w * f32(q)) * f32(q)))
        for g in range(G):
            b = suml2[g] > 0 and f32(sumlx[g] * sumlx[g]) > f32(best[g] * suml2[g]) and not tiny[g]
            better[g] = b
            s = f32(sumlx[g] / suml2[g])
            scale[g] = s if b else scale[g]
            best[g] = f32(s * sumlx[g]) if b else best[g]
        for i in range(n):
            for g in range(G):
                L[i, g] = laux[i, g] if better[g] else L[i, g]
    for g in range(G):
        if tiny[g]:
            scale[g] = f32(0)
            for i in range(n):
                L[i, g] = 0


@jit
def _k_scaled_rows(x, out, f16, nmax, rmin, nstep, q5):
    """quantize_row_q4_K_ref (q5=False: out (blocks, 144)) or quantize_row_q5_K_ref (q5=True: (blocks, 176))
    for x (blocks, 256): 8 sub-blocks of 32 per block searched by make_qkx2_quants (4 blocks' sub-blocks side
    by side), their scales and mins packed in 6 bits against the block's largest, every value re-quantized
    against the packed scales, then the levels packed."""
    nb = x.shape[0]
    per = _LANES // 8
    xt = np.empty((32, _LANES), np.float32)
    wt = np.empty((32, _LANES), np.float32)
    Lt = np.empty((32, _LANES), np.int32)
    laux = np.empty((32, _LANES), np.int32)
    st = np.empty((13, _LANES), np.float32)
    flat = np.empty(_LANES, np.bool_)
    better = np.empty(_LANES, np.bool_)
    sum_x2 = np.empty(_LANES, np.float32)
    L = np.empty(256, np.int32)
    for b0 in range(0, nb, per):
        nbl = min(per, nb - b0)
        G = 8 * nbl
        for g in range(G):
            xs = x[b0 + g // 8, 32 * (g % 8):32 * (g % 8) + 32]
            for l in range(32):
                xt[l, g] = xs[l]
        for g in range(G):
            sum_x2[g] = f32(0)
        for l in range(32):
            for g in range(G):
                sum_x2[g] = f32(sum_x2[g] + f32(xt[l, g] * xt[l, g]))
        for g in range(G):
            sum_x2[g] = f32(np.sqrt(f32(sum_x2[g] / f32(32))))  # av_x
        for l in range(32):
            for g in range(G):
                wt[l, g] = f32(sum_x2[g] + abs(xt[l, g]))
        qkx2_lanes(G, xt, wt, Lt, laux, nmax, rmin, f32(0.1), nstep, st, flat, better)
        for b in range(nbl):
            y = out[b0 + b]
            y[:] = 0
            xb = x[b0 + b]
            max_scale = f32(0)
            max_min = f32(0)
            for j in range(8):
                s = st[5, 8 * b + j]
                m = f32(-st[0, 8 * b + j])  # the_min
                st[0, 8 * b + j] = m
                if s > max_scale:
                    max_scale = s
                if m > max_min:
                    max_min = m
                for l in range(32):
                    L[32 * j + l] = Lt[l, 8 * b + j]
            inv_scale = f32(f32(63) / max_scale) if max_scale > 0 else f32(0)
            inv_min = f32(f32(63) / max_min) if max_min > 0 else f32(0)
            sc = y[4:16]
            for j in range(8):
                ls = min(63, nearest_int(f32(inv_scale * st[5, 8 * b + j])) & 0xFF)
                lm = min(63, nearest_int(f32(inv_min * st[0, 8 * b + j])) & 0xFF)
                if j < 4:
                    sc[j] = ls
                    sc[j + 4] = lm
                else:
                    sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                    sc[j - 4] |= (ls >> 4) << 6
                    sc[j] |= (lm >> 4) << 6
            hd = f16_bits(f32(max_scale / f32(63)))
            hm = f16_bits(f32(max_min / f32(63)))
            y[0] = hd & 0xFF
            y[1] = hd >> 8
            y[2] = hm & 0xFF
            y[3] = hm >> 8
            for j in range(8):  # get_scale_min_k4
                if j < 4:
                    s6 = sc[j] & 63
                    m6 = sc[j + 4] & 63
                else:
                    s6 = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
                    m6 = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
                d = f32(f16[hd] * f32(s6))
                if d == 0:
                    continue
                dm = f32(f16[hm] * f32(m6))
                for ii in range(32):
                    L[32 * j + ii] = max(0, min(nmax, nearest_int(f32(f32(xb[32 * j + ii] + dm) / d))))
            if not q5:
                for c in range(4):  # 4 chunks of 64: low nibble from the first 32, high from the next 32
                    for l in range(32):
                        y[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)
                continue
            qh = y[16:48]
            ql = y[48:176]
            m1 = 1
            m2 = 2
            for c in range(4):
                for j in range(32):
                    l1 = L[64 * c + j]
                    if l1 > 15:
                        l1 -= 16
                        qh[j] |= m1
                    l2 = L[64 * c + j + 32]
                    if l2 > 15:
                        l2 -= 16
                        qh[j] |= m2
                    ql[32 * c + j] = l1 | (l2 << 4)
                m1 <<= 2
                m2 <<= 2


@jit
def q4_k_rows(x, out, f16):
    """quantize_row_q4_K_ref: x (blocks, 256) float32 -> out (blocks, 144) uint8 (d, dmin, scales, qs)."""
    _k_scaled_rows(x, out, f16, 15, f32(-1.0), 20, False)


@jit
def q5_k_rows(x, out, f16):
    """quantize_row_q5_K_ref: x (blocks, 256) float32 -> out (blocks, 176) uint8 (d, dmin, scales, qh, qs)."""
    _k_scaled_rows(x, out, f16, 31, f32(-0.5), 15, True)


@jit
def q6_k_rows(x, out, f16):
    """quantize_row_q6_K_ref: x (blocks, 256) float32 -> out (blocks, 210) uint8 (ql, qh, scales, d); the
    16 groups of 16 of 2 blocks searched side by side (make_qx_quants)."""
    nb = x.shape[0]
    per = _LANES // 16
    xt = np.empty((16, _LANES), np.float32)
    Lt = np.empty((16, _LANES), np.int32)
    laux = np.empty((16, _LANES), np.int32)
    st = np.empty((7, _LANES), np.float32)
    tiny = np.empty(_LANES, np.bool_)
    better = np.empty(_LANES, np.bool_)
    L = np.empty(256, np.int32)
    for b0 in range(0, nb, per):
        nbl = min(per, nb - b0)
        G = 16 * nbl
        for g in range(G):
            xs = x[b0 + g // 16, 16 * (g % 16):16 * (g % 16) + 16]
            for l in range(16):
                xt[l, g] = xs[l]
        qx_rmse1_lanes(G, xt, 32, Lt, laux, st, tiny, better)
        for b in range(nbl):
            xb = x[b0 + b]
            y = out[b0 + b]
            y[:] = 0
            max_scale = f32(0)
            max_abs_scale = f32(0)
            for ib in range(16):
                s = st[0, 16 * b + ib]
                if abs(s) > max_abs_scale:
                    max_abs_scale = abs(s)
                    max_scale = s
                for l in range(16):
                    L[16 * ib + l] = Lt[l, 16 * b + ib]
            if max_abs_scale < _EPS:
                continue  # the whole block is zero, d included
            iscale = f32(f32(-128) / max_scale)
            hd = f16_bits(f32(f32(1) / iscale))
            y[208] = hd & 0xFF
            y[209] = hd >> 8
            for ib in range(16):
                s = min(127, nearest_int(f32(iscale * st[0, 16 * b + ib])))
                s = ((s + 128) & 0xFF) - 128  # stored as int8
                y[192 + ib] = s & 0xFF
                d = f32(f16[hd] * f32(s))
                if d == 0:
                    continue
                for ii in range(16):
                    L[16 * ib + ii] = max(-32, min(31, nearest_int(f32(xb[16 * ib + ii] / d)))) + 32
            for h in range(2):
                j = 128 * h
                for l in range(32):
                    q1 = L[j + l]
                    q2 = L[j + l + 32]
                    q3 = L[j + l + 64]
                    q4 = L[j + l + 96]
                    y[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                    y[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                    y[128 + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@jit
def q8_0_rows(x, out):
    """quantize_row_q8_0_ref: x (blocks, 32) float32 -> out (blocks, 34) uint8 (d, then 32 int8 roundf(x/d))."""
    half = f32(0.5)
    for i in range(x.shape[0]):
        xb = x[i]
        y = out[i]
        amax = f32(0)
        for j in range(32):
            v = abs(xb[j])
            amax = amax if amax > v else v  # MAX(amax, fabsf(v))
        d = f32(amax / f32(127))
        inv = f32(f32(1) / d) if d != 0 else f32(0)
        h = f16_bits(d)
        y[0] = h & 0xFF
        y[1] = h >> 8
        for j in range(32):
            q = f32(xb[j] * inv)
            t = f32(np.trunc(q))  # roundf: half away from zero; q - trunc(q) is exact
            frac = f32(q - t)
            if frac >= half:
                t = f32(t + f32(1))
            elif frac <= -half:
                t = f32(t - f32(1))
            y[2 + j] = np.int32(t) & 0xFF


@jit
def dq_q4_k_rows(b, y, f16):
    """Q4_K blocks b (blocks, 144) -> y (blocks, 256) float32, as gguf-py's dequantize computes them
    (d·sc·q - dmin·m per sub-block, each product rounded to float32)."""
    for i in range(b.shape[0]):
        blk = b[i]
        d = f16[blk[0] | (blk[1] << 8)]
        dmin = f16[blk[2] | (blk[3] << 8)]
        sc = blk[4:16]
        q = blk[16:144]
        out = y[i]
        for j in range(8):
            if j < 4:
                s6 = sc[j] & 63
                m6 = sc[j + 4] & 63
            else:
                s6 = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
                m6 = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
            dj = f32(d * f32(s6))
            mj = f32(dmin * f32(m6))
            shift = 4 * (j % 2)
            for l in range(32):
                out[32 * j + l] = f32(f32(dj * f32((q[32 * (j // 2) + l] >> shift) & 0xF)) - mj)


@jit
def dq_q6_k_rows(b, y, f16):
    """Q6_K blocks b (blocks, 210) -> y (blocks, 256) float32, as gguf-py's dequantize computes them."""
    for i in range(b.shape[0]):
        blk = b[i]
        d = f16[blk[208] | (blk[209] << 8)]
        out = y[i]
        for e in range(256):
            h = e // 128
            r = e % 128
            lo = (blk[64 * h + r % 64] >> (4 * (r // 64))) & 0xF
            hi = (blk[128 + 32 * h + r % 32] >> (2 * (r // 32))) & 3
            s = np.int32(blk[192 + e // 16])
            s = s - 256 if s > 127 else s
            out[e] = f32(f32(d * f32(s)) * f32((lo | (hi << 4)) - 32))


@jit
def dq_q8_0_rows(b, y, f16):
    """Q8_0 blocks b (blocks, 34) -> y (blocks, 32) float32: d · q."""
    for i in range(b.shape[0]):
        blk = b[i]
        d = f16[blk[0] | (blk[1] << 8)]
        for j in range(32):
            q = np.int32(blk[2 + j])
            y[i, j] = f32(d * f32(q - 256 if q > 127 else q))
