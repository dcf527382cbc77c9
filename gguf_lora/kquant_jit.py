"""The search loops of the K-quant reference kernels (ggml-quants.c: make_qkx2_quants, make_qx_quants),
compiled with numba: the C written out line by line, float32 throughout (every operation cast back to
float32, no fast-math, hence no FMA contraction: ggml-base's arithmetic). About 5x the numpy version in
quants.py, which stays as the fallback where numba cannot be imported; tests check both, byte for byte,
against llama-quantize."""
from __future__ import annotations

import numpy as np
from numba import njit

_MAGIC = np.float32(12582912.0)  # nearest_int: 1.5 * 2^23


@njit(cache=True, nogil=True)
def qkx2_groups(x, w, nmax, rmin, rdelta, nstep, use_mad, scales, mins, L):
    """make_qkx2_quants for every row of x (groups, n): scale -> scales, the_min -> mins, levels -> L."""
    G, n = x.shape
    buf = np.empty(1, np.float32)
    bits = buf.view(np.int32)
    laux = np.empty(n, np.int32)
    for g in range(G):
        xg, wg, lg = x[g], w[g], L[g]
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
            scales[g] = np.float32(0)
            mins[g] = -mn
            continue
        iscale = np.float32(np.float32(nmax) / np.float32(mx - mn))
        scale = np.float32(np.float32(1) / iscale)
        best = np.float32(0)
        for i in range(n):
            buf[0] = np.float32(np.float32(iscale * np.float32(xg[i] - mn)) + _MAGIC)
            q = max(0, min(nmax, (bits[0] & 0x007FFFFF) - 0x00400000))
            lg[i] = q
            diff = np.float32(np.float32(np.float32(scale * np.float32(q)) + mn) - xg[i])
            diff = abs(diff) if use_mad else np.float32(diff * diff)
            best = np.float32(best + np.float32(wg[i] * diff))
        for step in range(nstep + 1):
            iscale = np.float32(np.float32(np.float32(rmin + np.float32(rdelta * np.float32(step)))
                                           + np.float32(nmax)) / np.float32(mx - mn))
            sum_l = np.float32(0)
            sum_l2 = np.float32(0)
            sum_xl = np.float32(0)
            for i in range(n):
                buf[0] = np.float32(np.float32(iscale * np.float32(xg[i] - mn)) + _MAGIC)
                q = max(0, min(nmax, (bits[0] & 0x007FFFFF) - 0x00400000))
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
        scales[g] = scale
        mins[g] = -mn


@njit(cache=True, nogil=True)
def qx_rmse1_groups(x, nmax, scales, L):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for every row of x (groups, n)."""
    G, n = x.shape
    buf = np.empty(1, np.float32)
    bits = buf.view(np.int32)
    eps = np.float32(1e-15)
    for g in range(G):
        xg, lg = x[g], L[g]
        vmax = np.float32(0)
        amax = np.float32(0)
        for i in range(n):
            ax = abs(xg[i])
            if ax > amax:
                amax = ax
                vmax = xg[i]
        if amax < eps:
            for i in range(n):
                lg[i] = 0
            scales[g] = np.float32(0)
            continue
        iscale = np.float32(np.float32(-nmax) / vmax)
        sumlx = np.float32(0)
        suml2 = np.float32(0)
        for i in range(n):
            buf[0] = np.float32(np.float32(iscale * xg[i]) + _MAGIC)
            q = max(-nmax, min(nmax - 1, (bits[0] & 0x007FFFFF) - 0x00400000))
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
                buf[0] = np.float32(np.float32(iscale * xg[i]) + _MAGIC)
                q = max(-nmax, min(nmax - 1, (bits[0] & 0x007FFFFF) - 0x00400000))
                w = np.float32(xg[i] * xg[i])
                sumlx = np.float32(sumlx + np.float32(np.float32(w * xg[i]) * np.float32(q)))
                suml2 = np.float32(suml2 + np.float32(np.float32(w * np.float32(q)) * np.float32(q)))
            if suml2 > 0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
                for i in range(n):
                    buf[0] = np.float32(np.float32(iscale * xg[i]) + _MAGIC)
                    q = max(-nmax, min(nmax - 1, (bits[0] & 0x007FFFFF) - 0x00400000))
                    lg[i] = nmax + q
                scale = np.float32(sumlx / suml2)
                best = np.float32(scale * sumlx)
        scales[g] = scale
