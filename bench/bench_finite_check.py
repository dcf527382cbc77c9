"""What the finite-output check costs per encoded chunk, next to the encoding itself (gguf_lora/finite.py).

The check runs on every chunk merge, quantize and convert encode (1M values for the float and 32-block
types, 256k for K-quants): two reductions over the float32 rows for F32/F16/BF16, the F16 block scales for
block types. Reported as a fraction of that chunk's encode time, best of N runs:

    PYTHONPATH=. python bench/bench_finite_check.py
"""
from __future__ import annotations

import time

import gguf
import numpy as np

from gguf_lora import finite, quants

Q = gguf.GGMLQuantizationType


def best(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    rows = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    for qtype in (Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q6_K, Q.Q4_K):
        chunk = rows if qtype not in quants._K_QUANTS else rows[:256]
        encoded = quants._encode_rows(chunk, qtype)
        enc = best(lambda: quants._encode_rows(chunk, qtype), 5 if qtype in quants._K_QUANTS else 30)
        chk = best(lambda: finite.check(encoded, qtype, chunk), 30)
        print(f"{qtype.name:5s} chunk of {chunk.size:>8,} values: encode {enc * 1e3:8.2f} ms, check {chk * 1e3:6.3f} ms"
              f" ({chk / enc:6.1%} of the encode)")
    chk = best(lambda: finite.check(rows, Q.F32, rows), 30)
    print(f"F32   chunk of {rows.size:>8,} values: no encode (the rows are the output), check {chk * 1e3:6.3f} ms")


if __name__ == "__main__":
    main()
