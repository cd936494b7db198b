"""llama.cpp as the peer: build its tools, requantize the reference GGUF, and measure the results our way.

Subcommands (each prints progress and writes JSON rows under runs/llamacpp/):
    build       download the llama-cpp-python sdist (it vendors llama.cpp), build the four tools we use
    imatrix     importance matrix of the reference on the calibration text (Austen by default)
    quantize    requantize the reference into the low-bit llama.cpp types, plus ffn_down-only variants;
                records which tensors "required fallback quantization" and to what type
    accounting  measured linear bpw and model bpw of every produced GGUF (bytes on disk, gguf.GGUFReader)
    dequant     check that gguf.quants.dequantize reads one tensor of every type the GGUFs contain
    eval        score every GGUF with salomi's own loader and evaluator on identical windows
    llamappl    cross-check: llama.cpp's own llama-perplexity --kl-divergence on every GGUF
    bench       llama-bench decode (tg) and prefill (pp) tokens/s
    all         everything above, in order

Example:
    .venv/bin/python bench/llamacpp.py all
    .venv/bin/python bench/llamacpp.py eval --windows 8 --seq-len 1024

Files: the build and the GGUFs live in the cache ($SALOMI_CACHE or ~/.cache/salomi, subdir llamacpp);
the JSON results go to runs/llamacpp/ in the repository (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: make `salomi` importable
    sys.path.insert(0, str(REPO))

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # its sdist vendors llama.cpp commit 0c1e570
TARGETS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
CMAKE_FLAGS = (
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
)

# The llama.cpp types we compare against, in rough order of size. All have 256-wide blocks, so on this model's
# 576-wide rows most of them fall back per tensor; the ffn_down-only variants (1536-wide rows) avoid that.
TYPES = ("IQ1_S", "IQ1_M", "TQ1_0", "IQ2_XXS", "IQ2_XS", "IQ2_S", "TQ2_0", "Q2_K", "IQ3_XXS")
REFERENCE_LABEL = "Q4_1"  # the reference GGUF itself, kept as a row
CONTROL_LABEL = "Q4_1-requant"  # Q4_1 -> Q4_1 with the imatrix: the noise of requantizing, base of the variants
VARIANT_BASE = "Q4_1"
BENCH_TYPES = ("Q4_1", "TQ1_0", "IQ1_M", "IQ2_XXS")

# The linears our toolkit quantizes: attention q/k/v/output and the three MLP projections of every block.
LINEAR_RE = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")

# llama-quantize: "warning: blk.0.attn_k.weight - ncols    576 not divisible by 256 (required for type IQ1_S)
#                  [(WARNING: must use F16 due to unusual shape) ]-> falling back to  IQ4_NL"
FALLBACK_RE = re.compile(
    r"warning: (?P<name>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING: must use F16 due to unusual shape\)\s*)?"
    r"-> falling back to\s+(?P<got>\S+)"
)
FALLBACK_TOTAL_RE = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")
QUANT_SIZE_RE = re.compile(r"(model|quant) size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)")


# ---------------------------------------------------------------------------------------------- paths


def cache_root() -> Path:
    env = os.environ.get("SALOMI_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        from salomi.assets import cache_dir

        return Path(cache_dir())
    except Exception:
        return Path.home() / ".cache" / "salomi"


@dataclass
class Paths:
    root: Path  # <cache>/llamacpp
    runs: Path  # runs/llamacpp

    @property
    def src(self) -> Path:
        return self.root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"

    @property
    def bin(self) -> Path:
        return self.src / "build" / "bin"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def imatrix(self) -> Path:
        return self.models / "imatrix-austen.gguf"

    def tool(self, name: str) -> Path:
        p = self.bin / name
        if not p.is_file():
            sys.exit(f"{p} does not exist; run `bench/llamacpp.py build` first")
        return p

    def gguf(self, label: str) -> Path:
        return self.models / f"smollm2-{label.replace('=', '-')}.gguf"


def make_paths(args: argparse.Namespace) -> Paths:
    root = Path(args.cache).expanduser() if args.cache else cache_root() / "llamacpp"
    runs = Path(args.runs).expanduser() if args.runs else REPO / "runs" / "llamacpp"
    runs.mkdir(parents=True, exist_ok=True)
    return Paths(root=root, runs=runs)


def reference_gguf(args: argparse.Namespace) -> Path:
    """The reference GGUF: --ref, else $SALOMI_REF_GGUF, else salomi's embedded default model."""
    if args.ref:
        return Path(args.ref).expanduser()
    if os.environ.get("SALOMI_REF_GGUF"):
        return Path(os.environ["SALOMI_REF_GGUF"]).expanduser()
    from salomi.assets import ensure

    p = Path(ensure("smollm2"))
    if p.is_dir():
        found = sorted(p.rglob("*.gguf"))
        if not found:
            sys.exit(f"no .gguf in {p}")
        p = found[0]
    return p


def variant_label(t: str) -> str:
    return f"{VARIANT_BASE}+ffn_down={t}"


def all_labels(types: tuple[str, ...], variants: bool = True) -> list[str]:
    labels = [REFERENCE_LABEL, CONTROL_LABEL, *types]
    if variants:
        labels += [variant_label(t) for t in types]
    return labels


def label_path(paths: Paths, ref: Path, label: str) -> Path:
    return ref if label == REFERENCE_LABEL else paths.gguf(label)


# ---------------------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[llamacpp {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return None


def write_json(paths: Paths, name: str, payload: dict) -> Path:
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git_commit": git_commit(),
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "host": platform.node(),
        **payload,
    }
    out = paths.runs / f"{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    log(f"wrote {out}")
    return out


def run_logged(cmd: list[str], logfile: Path, cwd: Path | None = None) -> tuple[int, float, str]:
    """Run cmd with stdout+stderr into logfile; return (returncode, seconds, log text)."""
    log("$ " + " ".join(map(str, cmd)))
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(logfile, "w") as f:
        rc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    dt = time.time() - t0
    return rc, dt, logfile.read_text(errors="replace")


# ---------------------------------------------------------------------------------------------- build


def cmd_build(args: argparse.Namespace) -> dict:
    paths = make_paths(args)
    binaries = [paths.bin / t for t in TARGETS]
    if all(b.is_file() for b in binaries) and not args.force:
        log(f"binaries already present in {paths.bin}; skipping (use --force to rebuild)")
        return {"skipped": True, "bin": str(paths.bin)}
    paths.root.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    sdist = paths.root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(paths.root)]  # fmt: skip
        log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True)
    if not paths.src.is_dir():
        log(f"extracting {sdist}")
        with tarfile.open(sdist) as tf:
            tf.extractall(paths.root, filter="data")
    configure = ["cmake", "-B", "build", *CMAKE_FLAGS]
    build = ["cmake", "--build", "build", f"-j{args.jobs}", "--target", *TARGETS]
    t0 = time.time()
    log("$ " + " ".join(configure))
    subprocess.run(configure, cwd=paths.src, check=True)
    t1 = time.time()
    log("$ " + " ".join(build))
    subprocess.run(build, cwd=paths.src, check=True)
    t2 = time.time()
    missing = [str(b) for b in binaries if not b.is_file()]
    if missing:
        sys.exit(f"build finished but these are missing: {missing}")
    row = {
        "skipped": False,
        "src": str(paths.src),
        "bin": str(paths.bin),
        "configure": " ".join(configure),
        "build": " ".join(build),
        "configure_s": round(t1 - t0, 1),
        "build_s": round(t2 - t1, 1),
        "total_s": round(t2 - t_all, 1),
    }
    log(f"built {', '.join(TARGETS)} in {row['build_s']} s (total {row['total_s']} s)")
    write_json(paths, "build", row)
    return row


# ---------------------------------------------------------------------------------------------- imatrix


def calibration_text(name: str, n_chars: int) -> str:
    from salomi.data.texts import load_text

    text = load_text(name)
    if len(text) < n_chars:
        log(f"warning: calibration text {name!r} has only {len(text)} characters (< {n_chars})")
    return text[:n_chars]


def cmd_imatrix(args: argparse.Namespace) -> dict:
    paths = make_paths(args)
    ref = reference_gguf(args)
    out = paths.imatrix
    if out.is_file() and not args.force:
        log(f"{out} exists; skipping (use --force to recompute)")
        return {"skipped": True, "imatrix": str(out)}
    paths.models.mkdir(parents=True, exist_ok=True)
    # Enough characters for chunks x ctx tokens (English prose is ~4-5 chars/token); llama-imatrix then takes the
    # first `chunks` windows of `ctx` tokens from the start of the text.
    calib = paths.models / f"calib-{args.calib_text.replace(':', '-').replace('/', '_')}.txt"
    calib.write_text(calibration_text(args.calib_text, args.chunks * args.ctx * 7), encoding="utf-8")
    cmd = [paths.tool("llama-imatrix"), "-m", ref, "-f", calib, "-o", out, "-c", args.ctx, "--chunks", args.chunks,
           "-t", args.threads, "-b", args.ctx, "--output-frequency", 1000]  # fmt: skip
    rc, dt, text = run_logged(cmd, paths.runs / "imatrix.log")
    if rc != 0 or not out.is_file():
        sys.exit(f"llama-imatrix failed (rc={rc}); see {paths.runs / 'imatrix.log'}")
    m = re.search(r"computing over (\d+) chunks", text)
    ppl = re.findall(r"\[(\d+)\]([\d.]+)", text)
    row = {
        "skipped": False,
        "command": " ".join(map(str, cmd)),
        "reference": str(ref),
        "calibration_text": args.calib_text,
        "calibration_slice": f"first {args.chunks} x {args.ctx} tokens (llama.cpp tokenizer) of {args.calib_text}",
        "calibration_file": str(calib),
        "chunks_computed": int(m.group(1)) if m else None,
        "ctx": args.ctx,
        "threads": args.threads,
        "final_chunk_ppl": float(ppl[-1][1]) if ppl else None,
        "seconds": round(dt, 1),
        "imatrix": str(out),
    }
    log(f"imatrix over {row['chunks_computed']} chunks of {args.ctx} tokens in {dt:.0f} s -> {out}")
    write_json(paths, "imatrix", row)
    return row


# ---------------------------------------------------------------------------------------------- quantize


def parse_fallbacks(text: str) -> dict:
    """Fallback lines of a llama-quantize log -> {tensors: [...], by_type: {"IQ1_S->IQ4_NL": n}, reported: n}."""
    tensors = [
        {
            "tensor": m["name"],
            "ncols": int(m["ncols"]),
            "block": int(m["block"]),
            "wanted": m["wanted"],
            "got": m["got"],
        }
        for m in FALLBACK_RE.finditer(text)
    ]
    by = Counter(f"{t['wanted']}->{t['got']}" for t in tensors)
    total = FALLBACK_TOTAL_RE.search(text)
    return {
        "count": len(tensors),
        "reported": int(total.group(1)) if total else 0,
        "by_type": dict(sorted(by.items())),
        "by_role": dict(sorted(Counter(re.sub(r"^blk\.\d+\.", "", t["tensor"]) for t in tensors).items())),
        "tensors": tensors,
    }


def quantize_one(paths: Paths, ref: Path, label: str, args: argparse.Namespace) -> dict:
    out = paths.gguf(label)
    if label == CONTROL_LABEL:
        ftype, extra = VARIANT_BASE, []
    elif label.startswith(VARIANT_BASE + "+ffn_down="):
        t = label.split("=", 1)[1]
        ftype, extra = VARIANT_BASE, ["--tensor-type", f"ffn_down={t.lower()}"]
    else:
        ftype, extra = label, []
    cmd = [paths.tool("llama-quantize"), "--allow-requantize", "--imatrix", paths.imatrix, *extra, ref, out, ftype,
           args.threads]  # fmt: skip
    logfile = paths.runs / "quantize-logs" / f"{label.replace('=', '-')}.log"
    if out.is_file() and logfile.is_file() and not args.force:
        log(f"{out.name} exists; reusing (use --force to redo)")
        rc, dt, text = 0, None, logfile.read_text(errors="replace")
    else:
        rc, dt, text = run_logged(cmd, logfile)
        if rc != 0 or not out.is_file():
            log(f"llama-quantize failed for {label} (rc={rc}); see {logfile}")
            return {"label": label, "ok": False, "returncode": rc, "command": " ".join(map(str, cmd)),
                    "log": str(logfile)}  # fmt: skip
    sizes = {k: (float(mib), float(bpw)) for k, mib, bpw in QUANT_SIZE_RE.findall(text)}
    fb = parse_fallbacks(text)
    row = {
        "label": label,
        "ok": True,
        "ftype": ftype,
        "command": " ".join(map(str, cmd)),
        "gguf": str(out),
        "seconds": round(dt, 1) if dt is not None else None,
        "llama_quant_size_mib": sizes.get("quant", (None,))[0],
        "llama_reported_bpw": sizes.get("quant", (None, None))[1],  # llama.cpp's own: all bytes / all elements
        "fallbacks": fb,
        "log": str(logfile),
    }
    log(f"{label:24s} fallbacks={fb['count']:3d} {fb['by_type']}  llama.cpp says {row['llama_reported_bpw']} BPW")
    return row


def cmd_quantize(args: argparse.Namespace) -> dict:
    paths = make_paths(args)
    ref = reference_gguf(args)
    if not paths.imatrix.is_file():
        sys.exit(f"{paths.imatrix} missing; run `bench/llamacpp.py imatrix` first")
    paths.models.mkdir(parents=True, exist_ok=True)
    types = tuple(args.types)
    labels = [CONTROL_LABEL, *types] + ([variant_label(t) for t in types] if args.variants else [])
    rows = [{"label": REFERENCE_LABEL, "ok": True, "ftype": "Q4_1", "command": None, "gguf": str(ref),
             "fallbacks": {"count": 0, "reported": 0, "by_type": {}, "by_role": {}, "tensors": []}}]  # fmt: skip
    for label in labels:
        rows.append(quantize_one(paths, ref, label, args))
    write_json(paths, "quantize", {"reference": str(ref), "imatrix": str(paths.imatrix), "rows": rows})
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------- accounting


def account(path: Path, ref_params: int) -> dict:
    """Measured bpw of one GGUF from its tensor bytes (gguf.GGUFReader) and its size on disk."""
    import gguf

    r = gguf.GGUFReader(str(path))
    lin_bytes = lin_weights = 0
    lin_types: Counter = Counter()  # weights per ggml type among the linears
    other: dict[str, str] = {}
    for t in r.tensors:
        if LINEAR_RE.match(t.name):
            lin_bytes += int(t.n_bytes)
            lin_weights += int(t.n_elements)
            lin_types[t.tensor_type.name] += int(t.n_elements)
        elif t.name in ("token_embd.weight", "output.weight"):
            other[t.name] = t.tensor_type.name
    if lin_weights == 0:
        raise ValueError(f"{path}: no linear tensors matched {LINEAR_RE.pattern}")
    file_bytes = path.stat().st_size
    return {
        "file_bytes": file_bytes,
        "linear_bytes": lin_bytes,
        "linear_weights": lin_weights,
        "linear_bpw": lin_bytes * 8 / lin_weights,
        "model_bpw": file_bytes * 8 / ref_params,
        "reference_params": ref_params,
        "linear_types": {k: round(v / lin_weights, 4) for k, v in lin_types.most_common()},  # share of weights
        "embedding_types": other,
    }


def reference_params(ref: Path) -> int:
    import gguf

    return sum(int(t.n_elements) for t in gguf.GGUFReader(str(ref)).tensors)


def cmd_accounting(args: argparse.Namespace) -> dict:
    paths = make_paths(args)
    ref = reference_gguf(args)
    n_ref = reference_params(ref)
    log(f"reference {ref.name}: {n_ref:,} parameters")
    qrows = {}
    qfile = paths.runs / "quantize.json"
    if qfile.is_file():
        qrows = {r["label"]: r for r in json.loads(qfile.read_text())["rows"]}
    rows = []
    for label in all_labels(tuple(args.types), args.variants):
        p = label_path(paths, ref, label)
        if not p.is_file():
            log(f"{label}: {p} missing, skipped")
            continue
        row = {"label": label, "gguf": str(p), **account(p, n_ref)}
        q = qrows.get(label, {})
        row["fallback_count"] = q.get("fallbacks", {}).get("count")
        row["fallbacks_by_type"] = q.get("fallbacks", {}).get("by_type")
        row["llama_reported_bpw"] = q.get("llama_reported_bpw")
        rows.append(row)
    print(format_accounting(rows))
    write_json(paths, "accounting", {"reference": str(ref), "reference_params": n_ref, "rows": rows})
    return {"rows": rows}


def format_accounting(rows: list[dict]) -> str:
    head = f"{'type':24s} {'linear bpw':>10s} {'model bpw':>9s} {'MiB':>7s} {'fallbacks':>9s}  linear weights by type"
    lines = [head, "-" * len(head)]
    for r in rows:
        fb = r.get("fallback_count")
        mix = ", ".join(f"{k} {v:.0%}" for k, v in r["linear_types"].items())
        lines.append(
            f"{r['label']:24s} {r['linear_bpw']:10.3f} {r['model_bpw']:9.3f} {r['file_bytes'] / 2**20:7.2f} "
            f"{'-' if fb is None else fb:>9}  {mix}; embd {r['embedding_types'].get('token_embd.weight')}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- dequant check


def cmd_dequant(args: argparse.Namespace) -> dict:
    """For every ggml type present in the produced GGUFs, dequantize one tensor with gguf.quants.dequantize and
    compare it to the same tensor of the reference (relative RMS error): fails loudly if the package cannot."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    paths = make_paths(args)
    ref = reference_gguf(args)
    rref = gguf.GGUFReader(str(ref))
    ref_t = {t.name: t for t in rref.tensors}
    seen: dict[str, dict] = {}
    for label in all_labels(tuple(args.types), args.variants):
        p = label_path(paths, ref, label)
        if not p.is_file():
            continue
        for t in gguf.GGUFReader(str(p)).tensors:
            ty = t.tensor_type.name
            if ty in seen or ty in ("F32", "F16"):
                continue
            row = {"type": ty, "tensor": t.name, "file": p.name}
            try:
                t0 = time.time()
                w = dequantize(t.data, t.tensor_type)
                row["seconds"] = round(time.time() - t0, 3)
                shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims fastest-first
                w = np.asarray(w, dtype=np.float32).reshape(shape)
                rt = ref_t[t.name]
                wr = np.asarray(dequantize(rt.data, rt.tensor_type), dtype=np.float32).reshape(shape)
                rel = float(np.sqrt(np.mean((w - wr) ** 2) / np.mean(wr**2)))
                row.update(ok=bool(np.isfinite(w).all()), shape=list(shape), rel_rms_err_vs_reference=round(rel, 4))
            except Exception as e:  # record and continue: the point is to list what fails
                row.update(ok=False, error=f"{type(e).__name__}: {e}")
            seen[ty] = row
            log(f"dequantize {ty:8s} {t.name:28s} ok={row['ok']} "
                f"rel_err={row.get('rel_rms_err_vs_reference', row.get('error'))}")  # fmt: skip
    rows = sorted(seen.values(), key=lambda r: r["type"])
    write_json(paths, "dequant", {"rows": rows})
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> dict:
    """Score every produced GGUF with salomi's loader (every tensor dequantized by the gguf package into a float32
    Hugging Face model) and salomi's evaluator, against the reference on identical windows of the eval text."""
    import shutil

    try:
        from salomi.data.texts import load_text
        from salomi.evaluation.evaluate import evaluate, make_windows, tokenize
        from salomi.loading.models import gguf_to_hf_dir, load_reference
    except ImportError as e:
        sys.exit(f"salomi's loader/evaluator is not available ({e}); eval cannot run")

    paths = make_paths(args)
    ref_path = reference_gguf(args)
    acc_rows = {}
    acc_file = paths.runs / "accounting.json"
    if acc_file.is_file():
        acc_rows = {r["label"]: r for r in json.loads(acc_file.read_text())["rows"]}
    log(f"loading reference {ref_path}")
    ref = load_reference(str(ref_path))
    ids = tokenize(ref.tokenizer, load_text(args.eval_text))
    windows = make_windows(ids, args.seq_len, args.windows, args.eval_text)
    log(f"eval text {args.eval_text}: {ids.numel():,} tokens; {args.windows} windows x {args.seq_len} from the start")
    labels = [lb for lb in all_labels(tuple(args.types), args.variants) if lb != REFERENCE_LABEL]
    labels = [lb for lb in labels if label_path(paths, ref_path, lb).is_file()]
    if args.labels:
        labels = [lb for lb in labels if lb in args.labels]
    rows: list[dict] = []
    common = {
        "eval_text": args.eval_text,
        "seq_len": args.seq_len,
        "windows": args.windows,
        "tokens_scored": args.windows * (args.seq_len - 1),
        "reference": str(ref_path),
    }
    ref_metrics = None
    for i in range(0, len(labels), args.group):
        group = labels[i : i + args.group]
        models, hf_dirs = [], []
        t0 = time.time()
        for lb in group:
            p = label_path(paths, ref_path, lb)
            log(f"loading {lb} ({p.name}) through salomi.loading")
            hf_dirs.append(gguf_to_hf_dir(p))
            models.append(load_reference(str(p)).model)
        t1 = time.time()
        ref_m, res = evaluate(ref.model, models, windows, progress=True, label="llamacpp")
        t2 = time.time()
        ref_metrics = ref_m
        for lb, r in zip(group, res):
            a = acc_rows.get(lb, {})
            row = {
                "label": lb,
                "method": f"llama.cpp {lb} (imatrix: {args.calib_text})",
                "linear_bpw": a.get("linear_bpw"),
                "model_bpw": a.get("model_bpw"),
                "fallback_count": a.get("fallback_count"),
                **{k: r[k] for k in ("ppl", "ref_ppl", "ratio", "kl", "top1")},
                "load_s": round((t1 - t0) / len(group), 1),
                "eval_s": round((t2 - t1) / len(group), 1),
                "gguf": str(label_path(paths, ref_path, lb)),
                **common,
            }
            rows.append(row)
            log(f"{lb:24s} ppl={r['ppl']:9.3f} ratio={r['ratio']:7.3f} KL={r['kl']:.4f} top1={r['top1']:.3f}")
        del models
        if not args.keep_hf:  # each float32 conversion is ~0.5 GB; they are cheap to recreate
            for d in hf_dirs:
                shutil.rmtree(d, ignore_errors=True)
        _write_eval(paths, rows, ref_metrics, acc_rows, common)
    return {"rows": rows}


def _write_eval(paths: Paths, rows: list[dict], ref_m: dict | None, acc_rows: dict, common: dict) -> None:
    a = acc_rows.get(REFERENCE_LABEL, {})
    ref_row = None
    if ref_m is not None:
        ref_row = {
            "label": REFERENCE_LABEL,
            "method": "reference (the Q4_1 GGUF, dequantized to float32)",
            "linear_bpw": a.get("linear_bpw"),
            "model_bpw": a.get("model_bpw"),
            "fallback_count": 0,
            "ppl": ref_m["ppl"],
            "ref_ppl": ref_m["ppl"],
            "ratio": 1.0,
            "kl": 0.0,
            "top1": 1.0,
            **common,
        }
    # Rows of earlier runs with the same protocol are kept (by label), so types can be evaluated in several runs.
    name = f"eval-{common['eval_text'].replace(':', '-')}-{common['windows']}x{common['seq_len']}"
    merged: dict[str, dict] = {}
    prev = paths.runs / f"{name}.json"
    if prev.is_file():
        merged = {r["label"]: r for r in json.loads(prev.read_text()).get("rows", [])}
    for r in ([ref_row] if ref_row else []) + rows:
        merged[r["label"]] = r
    order = {lb: i for i, lb in enumerate(all_labels(TYPES))}
    out = sorted(merged.values(), key=lambda r: (order.get(r["label"], len(order)), r["label"]))
    write_json(paths, name, {**common, "rows": out})


# ---------------------------------------------------------------------------------------------- llama-perplexity


def _llama_metric(text: str, pattern: str) -> float | None:
    m = re.search(pattern + r"\s*:?\s*([-\d.]+)", text)
    return float(m.group(1)) if m else None


def cmd_llamappl(args: argparse.Namespace) -> dict:
    """llama.cpp's own scoring (llama-perplexity --kl-divergence) of every GGUF, with llama.cpp's kernels.

    Not the protocol of our evaluator (llama-perplexity scores only the second half of each window), so its numbers
    are a cross-check of the gguf-package dequantize path, not rows to compare with ours directly."""
    paths = make_paths(args)
    ref = reference_gguf(args)
    from salomi.data.texts import load_text

    paths.models.mkdir(parents=True, exist_ok=True)
    text_file = paths.models / f"eval-{args.eval_text.replace(':', '-').replace('/', '_')}.txt"
    # generous slice: the tool takes the first `windows` windows of seq_len tokens
    text_file.write_text(load_text(args.eval_text)[: args.windows * args.seq_len * 8], encoding="utf-8")
    base = paths.models / f"kld-base-{args.windows}x{args.seq_len}.bin"
    common = ["-f", text_file, "-c", args.seq_len, "--chunks", args.windows, "-t", args.threads, "-b", args.seq_len]
    cmd = [paths.tool("llama-perplexity"), "-m", ref, *common, "--kl-divergence-base", base]
    rc, _, _ = run_logged(cmd, paths.runs / "llamappl-logs" / "base.log")
    if rc != 0:
        sys.exit(f"llama-perplexity failed on the reference; see {paths.runs / 'llamappl-logs' / 'base.log'}")
    rows = []
    for label in all_labels(tuple(args.types), args.variants):
        p = label_path(paths, ref, label)
        if not p.is_file():
            continue
        cmd = [paths.tool("llama-perplexity"), "-m", p, *common, "--kl-divergence-base", base, "--kl-divergence"]
        logf = paths.runs / "llamappl-logs" / f"{label.replace('=', '-')}.log"
        rc, dt, text = run_logged(cmd, logf)
        row = {
            "label": label,
            "ok": rc == 0,
            "ppl": _llama_metric(text, r"Mean PPL\(Q\)"),
            "ppl_base": _llama_metric(text, r"Mean PPL\(base\)"),
            "ratio": _llama_metric(text, r"Mean PPL\(Q\)/PPL\(base\)"),
            "kl": _llama_metric(text, r"Mean    KLD"),
            "top1": _llama_metric(text, r"Same top p"),
            "seconds": round(dt, 1),
            "command": " ".join(map(str, cmd)),
        }
        rows.append(row)
        log(f"{label:24s} ppl={row['ppl']} ratio={row['ratio']} KL={row['kl']} top1%={row['top1']}")
    write_json(paths, "llamappl", {
        "eval_text": args.eval_text, "windows": args.windows, "seq_len": args.seq_len,
        "scored": "second half of each window (llama-perplexity convention)", "rows": rows,
    })  # fmt: skip
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> dict:
    paths = make_paths(args)
    ref = reference_gguf(args)
    rows = []
    for label in args.bench_types:
        p = label_path(paths, ref, label)
        if not p.is_file():
            log(f"{label}: {p} missing, skipped")
            continue
        cmd = [paths.tool("llama-bench"), "-m", p, "-t", args.threads, "-p", args.pp, "-n", args.tg,
               "-r", args.reps, "-o", "json"]  # fmt: skip
        log("$ " + " ".join(map(str, cmd)))
        load = os.getloadavg()
        res = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        if res.returncode != 0:
            log(f"llama-bench failed for {label}: {res.stderr[-2000:]}")
            rows.append({"label": label, "ok": False, "stderr": res.stderr[-2000:]})
            continue
        for e in json.loads(res.stdout):
            kind = "pp" if e.get("n_prompt", 0) > 0 and e.get("n_gen", 0) == 0 else "tg"
            rows.append({
                "label": label, "ok": True, "test": f"{kind}{e['n_prompt'] or e['n_gen']}",
                "tokens_per_s": e["avg_ts"], "stddev": e["stddev_ts"], "threads": e.get("n_threads"),
                "model_type": e.get("model_type"), "model_size": e.get("model_size"), "cpu": e.get("cpu_info"),
                "reps": len(e.get("samples_ts", [])), "loadavg_before": [round(x, 2) for x in load],
                "command": " ".join(map(str, cmd)),
            })  # fmt: skip
            log(f"{label:10s} {rows[-1]['test']:6s} {e['avg_ts']:9.1f} ± {e['stddev_ts']:.1f} tok/s")
        write_json(paths, "bench", {"rows": rows, "note": "partial: run in progress"})  # keep what is measured
    write_json(paths, "bench", {"rows": rows, "note": "machine shared with other jobs; see loadavg_before"})
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------- main


def cmd_all(args: argparse.Namespace) -> dict:
    for f in (cmd_build, cmd_imatrix, cmd_quantize, cmd_accounting, cmd_dequant, cmd_eval, cmd_llamappl, cmd_bench):
        log(f"=== {f.__name__[4:]} ===")
        f(args)
    return {}


COMMANDS = {
    "build": cmd_build,
    "imatrix": cmd_imatrix,
    "quantize": cmd_quantize,
    "accounting": cmd_accounting,
    "dequant": cmd_dequant,
    "eval": cmd_eval,
    "llamappl": cmd_llamappl,
    "bench": cmd_bench,
    "all": cmd_all,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/llamacpp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=list(COMMANDS))
    p.add_argument("--ref", help="reference GGUF (default: salomi's embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument(
        "--cache", help="build/model directory (default: $SALOMI_CACHE/llamacpp or ~/.cache/salomi/llamacpp)"
    )
    p.add_argument("--runs", help="JSON output directory (default: runs/llamacpp in the repository)")
    p.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for build")
    p.add_argument("--threads", type=int, default=2, help="threads for llama.cpp tools")
    p.add_argument("--types", nargs="+", default=list(TYPES), type=str.upper, help="llama.cpp types to produce")
    p.add_argument("--no-variants", dest="variants", action="store_false",
                   help=f"skip the {VARIANT_BASE}+ffn_down=TYPE variants")  # fmt: skip
    p.add_argument("--calib-text", default="austen", help="calibration text for the imatrix (salomi text name)")
    p.add_argument("--chunks", type=int, default=128, help="imatrix: number of calibration windows")
    p.add_argument("--ctx", type=int, default=512, help="imatrix: tokens per calibration window")
    p.add_argument("--eval-text", default="brown", help="evaluation text (salomi text name)")
    p.add_argument("--windows", type=int, default=8, help="eval: number of windows")
    p.add_argument("--seq-len", type=int, default=1024, help="eval: tokens per window")
    p.add_argument("--group", type=int, default=4, help="eval: candidate models held in memory at once")
    p.add_argument("--labels", nargs="+", help="eval: only these labels (e.g. IQ1_M 'Q4_1+ffn_down=IQ1_M')")
    p.add_argument("--keep-hf", action="store_true", help="eval: keep the float32 conversions of the GGUFs")
    p.add_argument("--bench-types", nargs="+", default=list(BENCH_TYPES), help="labels to run llama-bench on")
    p.add_argument("--pp", type=int, default=512, help="llama-bench prompt tokens")
    p.add_argument("--tg", type=int, default=128, help="llama-bench generated tokens")
    p.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
