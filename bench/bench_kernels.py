"""Benchmark the packed-weight C kernels (salomi.runtime.kernels) per storage format.

For each format and shape: GEMV (1 activation row, decode) and GEMM (prefill, --m rows)
time; effective bandwidth of the packed weight bytes (codes + fp16 scales/zeros) for
GEMV; the same product with torch float32 matmul on the dequantized weight; and, for
reference, a STREAM-style copy bandwidth measured in the same run (numpy copy of a
512 MB array, 1 thread and --threads threads, bytes counted as read + write like
STREAM's Copy). Matrices larger than the caches are rotated through enough copies that
every GEMV call reads its weights from DRAM.

    python bench/bench_kernels.py [--threads 2] [--m 64] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

import numpy as np
import torch

from salomi.packing.bits import row_bytes
from salomi.quantizers.base import PackedLinear
from salomi.runtime import kernels

SHAPES = [(576, 576), (1536, 576), (576, 1536), (8192, 8192)]  # (out, in)
FORMATS = [("sign", 0, 64), ("ternary", 0, 64), ("grid", 2, 64), ("grid", 4, 64)]  # (format, bits, group)
COLD_BYTES = 512 << 20  # rotate copies of a layer until they span this much memory


def random_layer(fmt: str, bits: int, group: int, o: int, i: int, rng: np.random.Generator) -> PackedLinear:
    """Random packed bytes (timing does not depend on the values)."""
    ng = i // group
    scale = rng.uniform(0.01, 0.1, (o, ng)).astype(np.float16)
    if fmt == "sign":
        t = {"bits": rng.integers(0, 256, (o, row_bytes(i, 1)), dtype=np.uint8), "scale": scale}
        return PackedLinear("bench", "sign", (o, i), t, {"group": group})
    if fmt == "ternary":
        t = {"trits": rng.integers(0, 243, (o, (i + 4) // 5), dtype=np.uint8), "scale": scale}
        return PackedLinear("bench", "ternary", (o, i), t, {"group": group})
    t = {
        "codes": rng.integers(0, 256, (o, row_bytes(i, bits)), dtype=np.uint8),
        "scale": scale,
        "zero": rng.uniform(0, (1 << bits) - 1, (o, ng)).astype(np.float16),
    }
    return PackedLinear("bench", "grid", (o, i), t, {"bits": bits, "group": group})


def timeit(fn, min_time: float = 0.3, reps: int = 5) -> float:
    """Median over `reps` batches of the per-call time; each batch runs >= min_time/reps."""
    fn()
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(min_time / reps / once))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def copy_bandwidth(threads: int, nbytes: int = 512 << 20) -> dict[str, float]:
    """STREAM Copy style: GB/s = 2 * bytes / time (read + write)."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t1 = min(_time_once(lambda: np.copyto(dst, src)) for _ in range(5))
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(c[0], c[-1] + 1) for c in chunks if c.size]

    def par():  # numpy releases the GIL inside large copies
        ts = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    tn = min(_time_once(par) for _ in range(5))
    return {"copy_gbs_1thread": 2 * nbytes / t1 / 1e9, f"copy_gbs_{threads}threads": 2 * nbytes / tn / 1e9}


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_layer(fmt, bits, group, o, i, threads, m, rng, l3_bytes):
    base = random_layer(fmt, bits, group, o, i, rng)
    nbytes = base.nbytes
    cold = nbytes * 4 > l3_bytes
    copies = max(1, min(64, -(-COLD_BYTES // nbytes))) if cold else 1
    layers = [base] + [random_layer(fmt, bits, group, o, i, rng) for _ in range(copies - 1)]
    preps = [kernels.prepare(p) for p in layers]
    x1 = torch.randn(1, i)
    xm = torch.randn(m, i)
    state = {"k": 0}

    def gemv():
        state["k"] = (state["k"] + 1) % len(preps)
        kernels.packed_matmul(x1, preps[state["k"]], threads)

    t_gemv = timeit(gemv)
    t_gemm = timeit(lambda: kernels.packed_matmul(xm, preps[0], threads), min_time=0.3, reps=3)
    w = base.dequantize().contiguous()  # torch fp32 baseline on the same weight
    wcopies = [w] if (w.numel() * 4 > l3_bytes * 2 or not cold) else [w] + [w.clone() for _ in range(3)]
    st = {"k": 0}

    def tgemv():
        st["k"] = (st["k"] + 1) % len(wcopies)
        torch.matmul(x1, wcopies[st["k"]].T)

    t_tgemv = timeit(tgemv)
    t_tgemm = timeit(lambda: torch.matmul(xm, w.T), min_time=0.3, reps=3)
    # correctness spot check on this very layer
    err = (kernels.packed_matmul(xm[:3], preps[0], threads) - xm[:3] @ w.T).abs().max().item()
    name = fmt if fmt != "grid" else f"grid{bits}"
    return {
        "format": name,
        "group": group,
        "out": o,
        "in": i,
        "bpw": round(base.bpw, 3),
        "weight_bytes": nbytes,
        "cold_copies": copies,
        "gemv_us": t_gemv * 1e6,
        "gemv_gbs": nbytes / t_gemv / 1e9,
        "torch_gemv_us": t_tgemv * 1e6,
        "gemm_m": m,
        "gemm_ms": t_gemm * 1e3,
        "gemm_gflops": 2 * m * o * i / t_gemm / 1e9,
        "torch_gemm_ms": t_tgemm * 1e3,
        "max_abs_err": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, default=64, help="activation rows for the GEMM (prefill) timing")
    ap.add_argument("--quick", action="store_true", help="skip the 8192x8192 shape")
    ap.add_argument("--isa", default="auto", help="avx512 | avx2 | scalar | auto")
    ap.add_argument("--json", metavar="OUT", help="write all results as JSON")
    args = ap.parse_args()

    kernels.set_isa(args.isa)
    torch.set_num_threads(args.threads)
    l3 = 32 << 20
    try:
        l3 = int(os.sysconf("SC_LEVEL3_CACHE_SIZE")) or l3
    except (ValueError, OSError):
        pass
    bw = copy_bandwidth(args.threads)
    copy_ref = max(bw.values())
    print(
        f"isa={kernels.isa()} (cpu best {kernels.cpu_isa()})  threads={args.threads}  torch {torch.__version__}  "
        f"load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus"
    )
    print("copy bandwidth (STREAM Copy, read+write): " + ", ".join(f"{k}={v:.1f} GB/s" for k, v in bw.items()))
    rng = np.random.default_rng(0)
    rows = []
    hdr = (
        f"{'format':8} {'out x in':>11} {'bpw':>5} {'MB':>7} {'cold':>4} | {'gemv us':>9} {'GB/s':>6} "
        f"{'/copy':>6} {'torch us':>9} {'speedup':>7} | {'gemm ms':>8} {'GFLOP/s':>8} {'torch ms':>8} {'speedup':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for o, i in SHAPES:
        if args.quick and o * i > 4_000_000:
            continue
        for fmt, bits, group in FORMATS:
            r = bench_layer(fmt, bits, group, o, i, args.threads, args.m, rng, l3)
            r["gemv_vs_copy"] = r["gemv_gbs"] / copy_ref
            r["gemv_speedup_vs_torch"] = r["torch_gemv_us"] / r["gemv_us"]
            r["gemm_speedup_vs_torch"] = r["torch_gemm_ms"] / r["gemm_ms"]
            rows.append(r)
            print(
                f"{r['format']:8} {f'{o}x{i}':>11} {r['bpw']:5.2f} {r['weight_bytes'] / 1e6:7.2f} "
                f"{'yes' if r['cold_copies'] > 1 else 'no':>4} | {r['gemv_us']:9.1f} {r['gemv_gbs']:6.1f} "
                f"{r['gemv_vs_copy']:6.2f} {r['torch_gemv_us']:9.1f} {r['gemv_speedup_vs_torch']:6.1f}x | "
                f"{r['gemm_ms']:8.2f} {r['gemm_gflops']:8.1f} {r['torch_gemm_ms']:8.2f} "
                f"{r['gemm_speedup_vs_torch']:6.2f}x",
                flush=True,
            )
    print(
        f"GB/s = packed weight bytes (codes + fp16 scales/zeros) per GEMV call; /copy = that over the best copy "
        f"bandwidth ({copy_ref:.1f} GB/s); cold = layer rotated through copies spanning >= {COLD_BYTES >> 20} MB; "
        f"GEMM m={args.m}."
    )
    if args.json:
        meta = {
            "isa": kernels.isa(),
            "cpu_isa": kernels.cpu_isa(),
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "loadavg": os.getloadavg(),
            **bw,
            "copy_ref_gbs": copy_ref,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
