"""End-to-end speed and memory: prefill and decode tokens/s and peak RSS, each model
in its own process (so memory is its own), all in one run on the same machine.

    python -m salomi.runtime.bench --one FILE_OR_MODEL --runtime kernels   # one measurement, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from salomi.errors import SalomiError

RUNTIMES = ("kernels", "engine", "engine-int8", "dequant")  # engine-int8: Engine(activations="int8")
ENGINE_ACTIVATIONS = {"engine": "float", "engine-int8": "int8"}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def measure_one(target: str, runtime: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict[str, Any]:
    # Our kernels bring their own thread pool; torch's OpenMP pool spinning beside it
    # costs far more than the small ops (attention, norms) it would speed up.
    torch.set_num_threads(1 if runtime == "kernels" or runtime in ENGINE_ACTIVATIONS else threads)
    import transformers  # noqa: F401  (import cost is not the model's memory)

    base_rss = _rss_mb()
    if runtime in ENGINE_ACTIVATIONS:
        return _measure_engine(target, prompt_tokens, new_tokens, threads, base_rss, runtime)
    if target.endswith(".salomi"):
        from salomi.packing.model_file import build_model, load_quantized

        qf = load_quantized(target)
        model = build_model(qf, runtime)
        label, size = qf.method, qf.file_bytes
        bpw = qf.linear_bpw
    else:
        from salomi.loading.models import load_reference

        ref = load_reference(target)
        model, label, size, bpw = ref.model, "float32 torch", None, 32.0
        runtime = "torch"
    loaded_rss = _rss_mb()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (1, prompt_tokens), generator=g)
    model(ids[:, :8], use_cache=True)  # warm-up (kernel tables, allocator)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill_s = time.perf_counter() - t0
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    decode_s = time.perf_counter() - t0
    return {
        "model": label, "runtime": runtime, "file_bytes": size, "linear_bpw": bpw, "threads": threads,
        "prefill_tokens": prompt_tokens, "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tokens": new_tokens, "decode_tok_s": new_tokens / decode_s,
        "rss_base_mb": base_rss, "rss_loaded_mb": loaded_rss, "peak_rss_mb": _peak_mb(),
        "model_rss_mb": _peak_mb() - base_rss,
    }


def _measure_engine(target: str, prompt_tokens: int, new_tokens: int, threads: int, base_rss: float,
                    runtime: str = "engine") -> dict[str, Any]:
    """Same protocol as measure_one, through the native engine (one C call per token)."""
    from salomi.packing.model_file import load_quantized
    from salomi.runtime.engine import Engine

    qf = load_quantized(target)
    eng = Engine.from_file(qf, max_seq=prompt_tokens + new_tokens + 8, threads=threads,
                            activations=ENGINE_ACTIVATIONS[runtime])
    loaded_rss = _rss_mb()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (prompt_tokens,), generator=g)
    eng.forward(ids[:8], pos=0)  # warm-up
    t0 = time.perf_counter()
    logits = eng.forward(ids, pos=0)
    prefill_s = time.perf_counter() - t0
    nxt = int(np.argmax(logits.numpy()))  # as Engine.generate: numpy's argmax, ~70 us less than torch's
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = int(np.argmax(eng.forward([nxt]).numpy()))
    decode_s = time.perf_counter() - t0
    return {
        "model": qf.method, "runtime": runtime, "file_bytes": qf.file_bytes, "linear_bpw": qf.linear_bpw,
        "threads": threads, "prefill_tokens": prompt_tokens, "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tokens": new_tokens, "decode_tok_s": new_tokens / decode_s,
        "rss_base_mb": base_rss, "rss_loaded_mb": loaded_rss, "peak_rss_mb": _peak_mb(),
        "model_rss_mb": _peak_mb() - base_rss,
    }


def measure(target: str, runtime: str = "kernels", prompt_tokens: int = 128, new_tokens: int = 64,
            threads: int = 2) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "salomi.runtime.bench", "--one", target, "--runtime", runtime,
           "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark of {target} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", required=True)
    ap.add_argument("--runtime", default="kernels")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    r = measure_one(a.one, a.runtime, a.prompt_tokens, a.new_tokens, a.threads)
    print(json.dumps(r))


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _merge_rounds(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a row's per-round samples: tokens/s are medians (all samples kept), RSS the max."""
    row = dict(samples[0])
    for key in ("prefill_tok_s", "decode_tok_s"):
        vals = [r[key] for r in samples if key in r]
        if vals:
            row[key] = _median(vals)
            row[key + "_samples"] = [round(v, 2) for v in vals]
    for key in ("peak_rss_mb", "model_rss_mb"):
        if key in row:
            row[key] = max(r[key] for r in samples)
    row["rounds"] = len(samples)
    return row


def _llamacpp_rows(path: str) -> dict[str, dict[str, Any]]:
    """llama-bench rows of bench/llamacpp.py's JSON, one per label (pp -> prefill, tg -> decode)."""
    with open(path) as f:
        data = json.load(f)
    merged: dict[str, dict[str, Any]] = {}
    for r in data.get("rows", []) if isinstance(data, dict) else data:
        if not r.get("ok", True):
            continue
        m = merged.setdefault(r["label"], {"model": f"llama.cpp {r['label']}", "runtime": "llama.cpp",
                                           "threads": r.get("threads")})
        key = "prefill_tok_s" if str(r.get("test", "")).startswith("pp") else "decode_tok_s"
        m[key] = r["tokens_per_s"]
    return merged


def run_bench(files: list[str], model: str = "smollm2", prompt_tokens: int = 128, new_tokens: int = 64,
              threads: int = 2, llamacpp_json: str | None = "runs/llamacpp/bench.json",
              runtimes: tuple[str, ...] = ("kernels", "engine"), rounds: int = 1,
              llamacpp_cmd: str | None = None) -> list[dict[str, Any]]:
    """float32 torch, then each packed file through each runtime (kernels: HF modules calling
    the C kernels; engine: the native forward pass), and llama.cpp's rows if measured.

    rounds > 1 measures every row once per round, round after round (so a slow spell of a
    shared machine hits all rows alike), and reports medians. llamacpp_cmd, if given, is run
    (shell) at the start of every round and must rewrite llamacpp_json with one llama-bench
    repetition, so llama.cpp's rows are interleaved the same way."""
    from salomi.runtime import kernels

    if rounds < 1:
        raise SalomiError(f"--rounds must be >= 1 (got {rounds})")
    plan = [(model, "torch", threads)] + ([(model, "torch-1thread", 1)] if threads > 1 else [])
    plan += [(f, rt, threads) for f in files for rt in runtimes]
    samples: list[list[dict[str, Any]]] = [[] for _ in plan]
    llama: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(rounds):
        if llamacpp_cmd:
            p = subprocess.run(llamacpp_cmd, shell=True, capture_output=True, text=True)
            if p.returncode != 0:
                raise SalomiError(f"--llamacpp-cmd failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
            for label, row in _llamacpp_rows(str(llamacpp_json)).items():
                llama.setdefault(label, []).append(row)
        for i, (target, rt, th) in enumerate(plan):
            r = measure(target, "torch" if rt == "torch-1thread" else rt, prompt_tokens, new_tokens, th)
            if rt == "torch-1thread":
                r["runtime"] = rt
            r["file"] = os.path.basename(target)  # rows of two files with one method stay apart
            samples[i].append(r)
            if rounds > 1:
                print(f"[salomi] round {rnd + 1}/{rounds}: {r['model']} {r['runtime']} decode {r['decode_tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
    rows = [_merge_rounds(s) for s in samples]
    base = max(rows[: 2 if threads > 1 else 1], key=lambda r: r["decode_tok_s"])
    for r in rows:
        r["decode_vs_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_vs_fp32"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["isa"] = kernels.isa() if kernels.available() else "none"
    if not llama and llamacpp_json and os.path.exists(llamacpp_json):
        llama = {label: [row] for label, row in _llamacpp_rows(llamacpp_json).items()}
    merged = {label: _merge_rounds(runs) for label, runs in llama.items()}
    for m in merged.values():
        for key in ("decode", "prefill"):
            if f"{key}_tok_s" in m:
                m[f"{key}_vs_fp32"] = m[f"{key}_tok_s"] / base[f"{key}_tok_s"]
        rows.append(m)
    tq = merged.get("TQ1_0")
    if tq and "decode_tok_s" in tq:
        for r in rows:
            r["decode_vs_tq1_0"] = r["decode_tok_s"] / tq["decode_tok_s"]
    return rows


if __name__ == "__main__":
    main()
