"""Benchmark the packed-weight C kernels (salomi.runtime.kernels) per storage format.

For each format and shape: GEMV (1 activation row, decode) and GEMM (prefill, --m rows)
time; effective bandwidth of the packed weight bytes (codes + fp16 scales/zeros) for
GEMV; the same product with torch float32 matmul on the dequantized weight; and, for
reference, a STREAM-style copy bandwidth measured in the same run (numpy copy of a
512 MB array, 1 thread and --threads threads, bytes counted as read + write like
STREAM's Copy) and a read-only pass in C with 1 and 8 streams per thread (what a kernel that
only reads can stream here). Matrices larger than the caches are rotated through enough
copies that every GEMV call reads its weights from DRAM; for those the int8 table also
times a copy and an 8-stream read in the same interleaved rounds ("paired").

A second table compares the float kernels with the int8-activation kernels (csrc/lut.c,
packed_matmul(..., activations="int8")) on GEMV for sign, ternary and 2-, 4- and 8-bit grid (g64) at
the INT8_SHAPES:
time, GB/s of packed bytes, % of the copy bandwidth and speed-up vs torch float32 GEMV.
Float, int8 and torch batches are interleaved and the best batch of each is kept, so the
ratios come from the same minutes of a shared machine.

    python bench/bench_kernels.py [--threads 2] [--m 64] [--quick] [--only float|int8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from salomi.packing.bits import row_bytes
from salomi.quantizers.base import PackedLinear
from salomi.runtime import kernels

SHAPES = [(576, 576), (1536, 576), (576, 1536), (8192, 8192)]  # (out, in)
FORMATS = [("sign", 0, 64), ("ternary", 0, 64), ("grid", 2, 64), ("grid", 4, 64)]  # (format, bits, group)
INT8_SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (8192, 8192), (49152, 576)]  # (out, in); last: the head
# (format, bits, group); sign-tab / ternary-tab: per-row scales (group 0 = in) through the engine's
# T-MAC int8 tables
INT8_FORMATS = [("sign", 0, 64), ("sign-tab", 0, 0), ("ternary", 0, 64), ("ternary-tab", 0, 0), ("grid", 2, 64),
                ("grid", 4, 64), ("grid", 8, 64)]
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


class MemoryProbes:
    """The bandwidth figures a GEMV is held against, on one pair of 512 MB buffers: a STREAM
    Copy (numpy, GB/s = 2 * bytes / time, read + write) and a read-only pass in C
    (kernels.read_stream) with 1 or 8 streams per thread, the most a kernel that only reads
    could stream here."""

    def __init__(self, threads: int, nbytes: int = 512 << 20) -> None:
        self.threads, self.nbytes = threads, nbytes
        self.src = np.ones(nbytes // 8, dtype=np.float64)
        self.dst = np.empty_like(self.src)
        np.copyto(self.dst, self.src)
        chunks = np.array_split(np.arange(self.src.size), threads)
        self.bounds = [(c[0], c[-1] + 1) for c in chunks if c.size]
        self.raw = self.src.view(np.uint8)

    def copy(self, threads: int | None = None) -> None:
        if threads == 1:
            np.copyto(self.dst, self.src)
            return
        ts = [threading.Thread(target=np.copyto, args=(self.dst[a:b], self.src[a:b])) for a, b in self.bounds]
        for t in ts:  # numpy releases the GIL inside large copies
            t.start()
        for t in ts:
            t.join()

    def read(self, streams: int) -> None:
        kernels.read_stream(self.raw, streams, self.threads)

    def copy_gbs(self, t: float) -> float:
        return 2 * self.nbytes / t / 1e9

    def read_gbs(self, t: float, streams: int) -> float:
        return kernels.read_stream_bytes(self.nbytes, streams, self.threads) / t / 1e9

    def measure(self) -> dict[str, float]:
        n = self.threads
        t1 = min(_time_once(lambda: self.copy(1)) for _ in range(5))
        tn = min(_time_once(self.copy) for _ in range(5))
        r1 = min(_time_once(lambda: self.read(1)) for _ in range(5))
        r8 = min(_time_once(lambda: self.read(8)) for _ in range(5))
        return {"copy_gbs_1thread": self.copy_gbs(t1), f"copy_gbs_{n}threads": self.copy_gbs(tn),
                f"read_gbs_1stream_{n}threads": self.read_gbs(r1, 1), f"read_gbs_8streams_{n}threads": self.read_gbs(r8, 8)}


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


def cold_layers(
    fmt: str, bits: int, group: int, o: int, i: int, rng: np.random.Generator, l3_bytes: int
) -> list[PackedLinear]:
    """The layer plus enough random copies that GEMV streams them from DRAM when large."""
    base = random_layer(fmt, bits, group, o, i, rng)
    cold = base.nbytes * 4 > l3_bytes
    copies = max(1, min(64, -(-COLD_BYTES // base.nbytes))) if cold else 1
    return [base] + [random_layer(fmt, bits, group, o, i, rng) for _ in range(copies - 1)]


def best_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, min_time: float = 0.05) -> dict[str, float]:
    """Per-call time of each fn: rounds of one batch per fn, interleaved; the best batch wins."""
    n = {}
    for k, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        n[k] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(n[k]):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / n[k])
    return best


def bench_int8(
    fmt: str, bits: int, group: int, o: int, i: int, threads: int, rng: np.random.Generator, l3_bytes: int,
    probes: MemoryProbes | None = None,
) -> dict:
    tab = fmt.endswith("-tab")
    group = group or i
    layers = cold_layers(fmt.removesuffix("-tab"), bits, group, o, i, rng, l3_bytes)
    preps = [kernels.prepare(p) for p in layers]
    tables = [kernels.tables(p) for p in layers] if tab else []

    def int8(k: int) -> torch.Tensor:
        if tab:
            return kernels.tables_matmul(x1, tables[k], threads)
        return kernels.packed_matmul(x1, preps[k], threads, activations="int8")

    nbytes = layers[0].nbytes
    x1 = torch.randn(1, i)
    w = layers[0].dequantize().contiguous()
    wcopies = [w] if (len(layers) == 1 or w.numel() * 4 > l3_bytes * 2) else [w] + [w.clone() for _ in range(3)]
    st = {"f": 0, "q": 0, "t": 0}

    def nxt(key: str, n: int) -> int:
        st[key] = (st[key] + 1) % n
        return st[key]

    fns = {
        "float": lambda: kernels.packed_matmul(x1, preps[nxt("f", len(preps))], threads),
        "int8": lambda: int8(nxt("q", len(preps))),
        "torch": lambda: torch.matmul(x1, wcopies[nxt("t", len(wcopies))].T),
    }
    cold = len(layers) > 1
    if cold and probes is not None:  # from DRAM: the copy and read figures of the same minutes
        fns["copy"] = probes.copy
        fns["read8"] = lambda: probes.read(8)
    t = best_interleaved(fns)
    y8 = int8(0)
    yf = kernels.packed_matmul(x1, preps[0], threads)
    return {
        "format": fmt if fmt != "grid" else f"grid{bits}",
        "group": group,
        "out": o,
        "in": i,
        "weight_bytes": nbytes,
        "cold_copies": len(layers),
        "float_us": t["float"] * 1e6,
        "int8_us": t["int8"] * 1e6,
        "torch_us": t["torch"] * 1e6,
        "float_gbs": nbytes / t["float"] / 1e9,
        "int8_gbs": nbytes / t["int8"] / 1e9,
        "int8_rel_err": ((y8 - yf).norm() / yf.norm()).item(),
        **({"copy_gbs_paired": probes.copy_gbs(t["copy"]), "read8_gbs_paired": probes.read_gbs(t["read8"], 8)}
           if "copy" in t else {}),
    }


def run_int8_table(args: argparse.Namespace, copy_ref: float, l3: int, probes: MemoryProbes | None = None) -> list[dict]:
    print(f"\nGEMV, float vs int8 activations (threads={args.threads}, best of 7 interleaved batches)")
    hdr = (
        f"{'format':8} {'out x in':>11} {'MB':>6} {'cold':>4} | {'float us':>9} {'GB/s':>6} {'%copy':>6} "
        f"{'x torch':>7} | {'int8 us':>9} {'GB/s':>6} {'%copy':>6} {'x torch':>7} | {'int8/float':>10} {'rel err':>8} | "
        f"{'paired:':>7} {'%copy':>6} {'%read8':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(1)
    rows = []
    for o, i in INT8_SHAPES:
        if args.quick and o * i > 4_000_000:
            continue
        for fmt, bits, group in INT8_FORMATS:
            r = bench_int8(fmt, bits, group, o, i, args.threads, rng, l3, probes)
            r["float_vs_copy"] = r["float_gbs"] / copy_ref
            r["int8_vs_copy"] = r["int8_gbs"] / copy_ref
            r["float_speedup_vs_torch"] = r["torch_us"] / r["float_us"]
            r["int8_speedup_vs_torch"] = r["torch_us"] / r["int8_us"]
            r["int8_speedup_vs_float"] = r["float_us"] / r["int8_us"]
            paired = ""
            if "copy_gbs_paired" in r:
                r["int8_vs_copy_paired"] = r["int8_gbs"] / r["copy_gbs_paired"]
                r["int8_vs_read8_paired"] = r["int8_gbs"] / r["read8_gbs_paired"]
                paired = f"{'':7} {100 * r['int8_vs_copy_paired']:5.1f}% {100 * r['int8_vs_read8_paired']:5.1f}%"
            rows.append(r)
            print(
                f"{r['format']:8} {f'{o}x{i}':>11} {r['weight_bytes'] / 1e6:6.2f} {'yes' if r['cold_copies'] > 1 else 'no':>4} | "
                f"{r['float_us']:9.1f} {r['float_gbs']:6.1f} {100 * r['float_vs_copy']:5.1f}% "
                f"{r['float_speedup_vs_torch']:6.1f}x | {r['int8_us']:9.1f} {r['int8_gbs']:6.1f} "
                f"{100 * r['int8_vs_copy']:5.1f}% {r['int8_speedup_vs_torch']:6.1f}x | "
                f"{r['int8_speedup_vs_float']:9.2f}x {r['int8_rel_err']:8.4f} | {paired}",
                flush=True,
            )
    print(
        f"%copy = packed bytes (codes + fp16 scales) per GEMV over the best copy bandwidth ({copy_ref:.1f} GB/s); "
        f"rel err = ||y_int8 - y_float|| / ||y_float|| on one Gaussian row; paired (cold rows): the int8 GB/s over a "
        f"copy and over an 8-streams-per-thread read measured in the same interleaved rounds."
    )
    return rows


def run_main_table(args: argparse.Namespace, copy_ref: float, l3: int) -> list[dict]:
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
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, default=64, help="activation rows for the GEMM (prefill) timing")
    ap.add_argument("--quick", action="store_true", help="skip the 8192x8192 shape")
    ap.add_argument("--isa", default="auto", help="avx512 | avx2 | scalar | auto")
    ap.add_argument("--only", choices=["float", "int8"], help="run only the main table or only the int8 table")
    ap.add_argument("--json", metavar="OUT", help="write all results as JSON")
    args = ap.parse_args()

    kernels.set_isa(args.isa)
    torch.set_num_threads(args.threads)
    l3 = 32 << 20
    try:
        l3 = int(os.sysconf("SC_LEVEL3_CACHE_SIZE")) or l3
    except (ValueError, OSError):
        pass
    probes = MemoryProbes(args.threads)
    bw = probes.measure()
    copy_ref = max(v for k, v in bw.items() if k.startswith("copy"))
    print(
        f"isa={kernels.isa()} (cpu best {kernels.cpu_isa()})  threads={args.threads}  torch {torch.__version__}  "
        f"load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus"
    )
    print("copy bandwidth (STREAM Copy, read+write): " + ", ".join(f"{k}={v:.1f} GB/s" for k, v in bw.items()
                                                                 if k.startswith("copy")))
    print("read-only bandwidth (C, xor of 64-byte lines): " + ", ".join(
        f"{k}={v:.1f} GB/s ({100 * v / copy_ref:.0f}% of copy)" for k, v in bw.items() if k.startswith("read")))
    rows = run_main_table(args, copy_ref, l3) if args.only != "int8" else []
    int8_rows = run_int8_table(args, copy_ref, l3, probes) if args.only != "float" else []
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
            json.dump({"meta": meta, "results": rows, "int8": int8_rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
