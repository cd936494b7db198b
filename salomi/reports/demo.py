"""The README's main job: quantize the embedded default model with the baselines,
evaluate all of them against the reference on the same windows, print the table and
write it into docs/RESULTS.md with the command that made it."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from salomi import api
from salomi.evaluation.evaluate import evaluate, make_windows, tokenize
from salomi.loading.models import load_reference
from salomi.packing.model_file import build_model, load_quantized
from salomi.reports.results_md import QUALITY_COLUMNS, replace_section, table


def run_demo(windows: int = 16, seq_len: int = 1024, out_dir: str = "runs/demo", results: str = "docs/RESULTS.md",
             methods: str = "binary,ternary,rtn:2:g64,rtn:3:g64,rtn:4:g64", model: str = "smollm2",
             text: str = "brown") -> list[dict]:
    start = time.perf_counter()
    ref = load_reference(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for spec in methods.split(","):
        path = out / (spec.replace(":", "_").replace("+", "-") + ".salomi")
        print(f"[demo] quantizing {spec} -> {path}", file=sys.stderr)
        api.quantize(model=model, method=spec, out=path, reference=ref)
        files.append(path)
    from salomi.data.texts import load_text

    w = make_windows(tokenize(ref.tokenizer, load_text(text)), seq_len, windows, text)
    qfs = [load_quantized(f) for f in files]
    t0 = time.perf_counter()
    ref_metrics, metrics = evaluate(ref.model, [build_model(q) for q in qfs], w, label="demo eval")
    eval_s = time.perf_counter() - t0
    rows = [{"method": "reference (float32)", "ppl": ref_metrics["ppl"], "ratio": 1.0, "kl": 0.0, "top1": 1.0,
             "linear_bpw": None, "model_bpw": None, "file_bytes": None}]
    for qf, m in zip(qfs, metrics):
        rows.append({"method": qf.method, **m, "linear_bpw": qf.linear_bpw, "model_bpw": qf.model_bpw,
                     "file_bytes": qf.file_bytes, "quantize_seconds": qf.metadata["quantize"]["seconds"]})
    md = table(rows, QUALITY_COLUMNS)
    print(md)
    cmd = "make demo" if windows == 16 and seq_len == 1024 else "salomi demo " + " ".join(
        shlex.quote(a) for a in sys.argv[2:])
    total = time.perf_counter() - start
    body = (
        f"## Baselines on the default model (`{cmd}`)\n\n"
        f"Model: {ref.name} (the reference is the GGUF's Q4_1 weights dequantized to float32 — itself a 4-bit "
        f"model; every number is relative to it). Eval text: {text}, first {windows} non-overlapping windows of "
        f"{seq_len} tokens ({windows * (seq_len - 1):,} scored tokens). No calibration (these methods need none). "
        f"Unquantized tensors (embeddings/tied head) stored as float16, norms as float32; model bpw counts the "
        f"whole file over the reference's {ref.n_params:,} parameters. Eval {eval_s:.0f}s, total {total:.0f}s on "
        f"this 2-core machine; commit {api.git_commit()}.\n\n{md}\n"
    )
    replace_section(results, "demo", body)
    (out / "demo.json").write_text(json.dumps(rows, indent=2, default=str))
    print(f"\nwrote {results} and {out / 'demo.json'} ({total:.0f}s)")
    return rows
