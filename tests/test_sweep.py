"""The sweep's Pareto front and plot, on the tiny model end to end."""

from __future__ import annotations

import json
from pathlib import Path

from salomi.reports.sweep import pareto, quantize_args, run_sweep


def test_pareto_front() -> None:
    rows = [{"linear_bpw": b, "ratio": r, "id": i} for i, (b, r) in
            enumerate([(1.0, 50.0), (1.5, 60.0), (2.0, 3.0), (2.5, 2.0), (3.0, 2.5), (1.2, 10.0)])]
    assert [r["id"] for r in pareto(rows)] == [0, 5, 2, 3]


def test_budget_specs_become_quantize_arguments() -> None:
    assert quantize_args("gptq:2:g64+rot") == ["--method", "gptq:2:g64+rot"]
    assert quantize_args("budget:1.6") == ["--bpw", "1.6"]
    assert quantize_args("budget:1.6:kl") == ["--bpw", "1.6", "--damage", "kl"]
    assert quantize_args("budget:2.1:binary/gptq:3:g64:damage") == [
        "--bpw", "2.1", "--damage", "damage", "--candidates", "binary,gptq:3:g64"]
    assert quantize_args("budget:2.1:vq:d4:k64+ls+rot/gptq:4:g64+rot") == [
        "--bpw", "2.1", "--candidates", "vq:d4:k64+ls+rot,gptq:4:g64+rot"]


def test_sweep_tiny(tiny_llama_dir: Path, brown_slice: Path, austen_slice: Path, tmp_path: Path) -> None:
    llama_rows = tmp_path / "llamacpp.json"
    llama_rows.write_text(json.dumps([{"method": "FAKE_TYPE", "linear_bpw": 2.2, "model_bpw": 3.0, "ppl": 1.0,
                                       "ratio": 1.5, "kl": 0.1, "top1": 0.9, "windows": 2, "seq_len": 64,
                                       "text": str(brown_slice)}]))
    results = tmp_path / "RESULTS.md"
    rows = run_sweep(["rtn:2:g32", "binary"], model=str(tiny_llama_dir), out_dir=str(tmp_path / "sw"),
                     text=str(brown_slice), seq_len=64, windows=2, calib=str(austen_slice), segments=2, seg_len=32,
                     llamacpp_json=str(llama_rows), results=str(results), plot_path=str(tmp_path / "p.png"))
    assert [r["series"] for r in rows] == ["salomi", "salomi", "llama.cpp"]
    assert all(r["quantize_seconds"] >= 0 and r["peak_rss_mb"] > 0 for r in rows[:2])
    assert (tmp_path / "p.png").stat().st_size > 1000
    text = results.read_text()
    assert "FAKE_TYPE" in text and "rtn:2:g32" in text
    # A second run reuses the files (resumable) and replaces its section rather than appending.
    run_sweep(["rtn:2:g32", "binary"], model=str(tiny_llama_dir), out_dir=str(tmp_path / "sw"),
              text=str(brown_slice), seq_len=64, windows=2, results=str(results), plot_path=str(tmp_path / "p.png"))
    assert results.read_text().count("## Method sweep") == 1
