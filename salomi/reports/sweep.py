"""`salomi sweep`: many methods on one model, scored on the same windows, plotted
against measured bpw next to llama.cpp's types.

Each method is quantized in its own process (so its wall time and peak memory are its
own), skipped when its file already exists (a sweep resumes where it stopped), and
all files are then evaluated in one pass over the windows (one reference forward per
window for all methods).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from salomi import api
from salomi.errors import SalomiError
from salomi.reports.results_md import fmt, replace_section

SWEEP_COLUMNS = [
    ("series", "series"), ("method", "method"), ("linear_bpw", "linear bpw"), ("model_bpw", "model bpw"),
    ("ppl", "ppl"), ("ratio", "ratio"), ("kl", "KL"), ("top1", "top-1"),
    ("quantize_seconds", "quantize s"), ("peak_rss_mb", "peak MB"),
]


def _file_for(out_dir: Path, spec: str) -> Path:
    safe = spec.replace(":", "_").replace("+", "-").replace("/", "_")
    return out_dir / f"{safe}.salomi"


def quantize_args(spec: str) -> list[str]:
    """`salomi quantize` arguments for a sweep spec: a method, or budget:B[:c1/c2/...][:kl|damage|error]
    (mixed precision at B linear bpw over those candidates, allocated on that damage)."""
    if not spec.startswith("budget:"):
        return ["--method", spec]
    _, target, *rest = spec.split(":", 2)
    how = ["--bpw", target]
    body = rest[0] if rest else ""
    for damage in ("kl", "damage", "error"):  # no method spec ends in one of these words
        if body == damage or body.endswith(":" + damage):
            how += ["--damage", damage]
            body = body[: -len(damage)].rstrip(":")
            break
    return how + (["--candidates", body.replace("/", ",")] if body else [])


def quantize_in_subprocess(model: str, spec: str, path: Path, calib: str, segments: int, seg_len: int,
                           seed: int) -> dict[str, Any]:
    how = quantize_args(spec)
    cmd = [sys.executable, "-m", "salomi.cli", "quantize", "--model", model, *how, "--out", str(path),
           "--calib", calib, "--calib-segments", str(segments), "--calib-len", str(seg_len), "--seed", str(seed),
           "--resume"]
    print(f"[sweep] {' '.join(cmd[2:])}", file=sys.stderr)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if p.returncode != 0:
        raise SalomiError(f"quantizing {spec} failed (exit {p.returncode}); see the message above")
    from salomi.packing.model_file import load_quantized

    meta = load_quantized(path).metadata["quantize"]
    return {"quantize_seconds": meta["seconds"], "peak_rss_mb": meta["peak_rss_mb"]}


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows not beaten by another at lower-or-equal bpw and lower-or-equal ratio."""
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r["linear_bpw"], r["ratio"])):
        if r["ratio"] < best:
            front.append(r)
            best = r["ratio"]
    return front


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    series = sorted({r["series"] for r in rows})
    markers = {"salomi": "o", "llama.cpp": "s"}
    for s in series:
        pts = [r for r in rows if r["series"] == s]
        ax.scatter([r["linear_bpw"] for r in pts], [r["ratio"] for r in pts], label=s, marker=markers.get(s, "^"))
        for r in pts:
            ax.annotate(r["method"], (r["linear_bpw"], r["ratio"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        front = pareto(pts)
        ax.plot([r["linear_bpw"] for r in front], [r["ratio"] for r in front], linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("measured linear bits per weight (all stored bytes)")
    ax.set_ylabel("perplexity ratio vs reference (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(methods: list[str], model: str = "smollm2", out_dir: str = "runs/sweep", text: str = "brown",
              seq_len: int = 1024, windows: int = 8, calib: str = "austen", segments: int = 128, seg_len: int = 512,
              seed: int = 0, llamacpp_json: str | None = None, results: str | None = "docs/RESULTS.md",
              plot_path: str = "docs/sweep.png", command: str = "") -> list[dict[str, Any]]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.json"
    start = time.perf_counter()
    costs = {}
    for spec in methods:
        costs[spec] = quantize_in_subprocess(model, spec, _file_for(out, spec), calib, segments, seg_len, seed) \
            if not _file_for(out, spec).exists() else _cost_from_file(_file_for(out, spec))
    files = [_file_for(out, s) for s in methods]
    ev = api.evaluate_files(files, text=text, seq_len=seq_len, windows=windows, model=model)
    rows = []
    for spec, r in zip(methods, ev):
        rows.append({"series": "salomi", **r, **costs[spec], "method": spec})
    if llamacpp_json and Path(llamacpp_json).exists():
        data = json.loads(Path(llamacpp_json).read_text())
        for r in data.get("rows", []) if isinstance(data, dict) else data:
            same = (r.get("windows") == windows and r.get("seq_len") == seq_len
                    and (r.get("text") or r.get("eval_text")) == text)
            if same and r.get("ratio") != 1.0 and r.get("linear_bpw") is not None:
                rows.append({"series": "llama.cpp", **r, "method": r.get("label", r.get("method"))})
    tmp = rows_path.with_name("rows.json.tmp")
    tmp.write_text(json.dumps(rows, indent=2, default=str))
    tmp.replace(rows_path)
    title = (f"{rows[0]['model']}: {text}, {windows}x{seq_len} tokens; calib {calib} {segments}x{seg_len} "
             f"seed {seed}")
    plot(rows, Path(plot_path), title)
    md = _markdown(rows)
    print(md)
    if results:
        body = (f"## Method sweep (`{command or 'salomi sweep'}`)\n\n"
                f"{title}. Reference: the GGUF's Q4_1 weights in float32 (itself 4-bit). Ratio = ppl / reference "
                f"ppl on the same windows; quantize time and peak RSS measured per method in its own process "
                f"(2 cores). Total {time.perf_counter() - start:.0f}s, commit {api.git_commit()}.\n\n"
                f"![sweep]({Path(plot_path).name})\n\n{md}\n")
        replace_section(results, "sweep", body)
    return rows


def _cost_from_file(path: Path) -> dict[str, Any]:
    from salomi.packing.model_file import load_quantized

    meta = load_quantized(path).metadata["quantize"]
    return {"quantize_seconds": meta["seconds"], "peak_rss_mb": meta["peak_rss_mb"]}


def _markdown(rows: list[dict[str, Any]]) -> str:
    front = {id(r) for s in {r["series"] for r in rows} for r in pareto([x for x in rows if x["series"] == s])}
    head = "| " + " | ".join(c[1] for c in SWEEP_COLUMNS) + " | Pareto |"
    lines = [head, "|" + "---|" * (len(SWEEP_COLUMNS) + 1)]
    for r in sorted(rows, key=lambda r: (r["series"], r["linear_bpw"])):
        lines.append("| " + " | ".join(fmt(r.get(k)) for k, _ in SWEEP_COLUMNS) + f" | {'*' if id(r) in front else ''} |")
    return "\n".join(lines)
