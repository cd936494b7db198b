"""salomi bench --rounds: rows measured round after round (interleaved), medians reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from salomi.errors import SalomiError
from salomi.runtime import bench


def test_rounds_interleave_and_report_medians(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, str, int]] = []
    speeds = {"smollm2": [10.0, 30.0, 20.0], "a.salomi": [50.0, 10.0, 40.0]}

    def fake_measure(target: str, runtime: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict[str, Any]:
        calls.append((target, runtime, threads))
        n = sum(1 for c in calls if c == (target, runtime, threads))
        dec = speeds[target][n - 1] * (0.5 if threads == 1 else 1.0)
        return {"model": target, "runtime": runtime, "decode_tok_s": dec, "prefill_tok_s": 10 * dec,
                "peak_rss_mb": 100.0 + n, "model_rss_mb": float(n)}

    monkeypatch.setattr(bench, "measure", fake_measure)
    # llama.cpp: the command rewrites the JSON every round (TQ1_0 tg = 8, 12, 10 over the rounds)
    lj, counter = tmp_path / "bench.json", tmp_path / "n"
    script = tmp_path / "llama.py"
    script.write_text(
        "import json, pathlib\n"
        f"c = pathlib.Path({str(counter)!r}); n = int(c.read_text()) if c.exists() else 0; c.write_text(str(n + 1))\n"
        f"tg = [8.0, 12.0, 10.0][n]\n"
        f"pathlib.Path({str(lj)!r}).write_text(json.dumps({{'rows': [\n"
        "  {'label': 'TQ1_0', 'test': 'tg128', 'tokens_per_s': tg},\n"
        "  {'label': 'TQ1_0', 'test': 'pp512', 'tokens_per_s': 100.0}]}))\n")
    import sys

    rows = bench.run_bench(["a.salomi"], "smollm2", threads=2, llamacpp_json=str(lj), runtimes=("engine",), rounds=3,
                           llamacpp_cmd=f"{sys.executable} {script}")
    # every round runs every row once, in plan order
    assert calls == [("smollm2", "torch", 2), ("smollm2", "torch", 1), ("a.salomi", "engine", 2)] * 3
    by = {(r["model"], r["runtime"]): r for r in rows}
    torch2, torch1, eng = by[("smollm2", "torch")], by[("smollm2", "torch-1thread")], by[("a.salomi", "engine")]
    assert torch2["decode_tok_s"] == 20.0 and torch2["decode_tok_s_samples"] == [10.0, 30.0, 20.0]
    assert torch1["decode_tok_s"] == 10.0
    assert eng["decode_tok_s"] == 40.0 and eng["rounds"] == 3 and eng["peak_rss_mb"] == 103.0
    assert eng["decode_vs_fp32"] == pytest.approx(2.0)  # against the faster float baseline's median
    tq = by[("llama.cpp TQ1_0", "llama.cpp")]
    assert tq["decode_tok_s"] == 10.0 and tq["decode_tok_s_samples"] == [8.0, 12.0, 10.0]
    assert eng["decode_vs_tq1_0"] == pytest.approx(4.0)
    assert json.loads(lj.read_text())["rows"][0]["tokens_per_s"] == 10.0


def test_bad_rounds_and_failing_llamacpp_cmd_are_errors(tmp_path: Path) -> None:
    with pytest.raises(SalomiError, match="--rounds"):
        bench.run_bench([], rounds=0)
    with pytest.raises(SalomiError, match="--llamacpp-cmd failed"):
        bench.run_bench([], llamacpp_json=str(tmp_path / "x.json"), llamacpp_cmd="exit 3")


def test_recovery_step_bench_times_real_steps(packed: Path, tmp_path: Path) -> None:
    """bench/recovery_step.py runs the CLI's end-to-end steps: warm-up apart, the median of the timed ones."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recovery_step", Path(__file__).parents[1] / "bench" / "recovery_step.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main([str(packed), "--steps", "2", "--warmup", "1", "--segments", "4", "--seg-len", "32",
                     "--batch", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [s["warmup"] for s in r["steps"]] == [True, False, False]
    assert all(s["seconds"] > 0 and s["loss"] >= 0 and s["minor_faults_M"] >= 0 for s in r["steps"])
    assert r["median_step_s"] == pytest.approx((r["steps"][1]["seconds"] + r["steps"][2]["seconds"]) / 2)
    assert r["peak_rss_mb"] > 0
