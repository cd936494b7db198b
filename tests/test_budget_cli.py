"""`salomi quantize --bpw`: the measured linear bpw of the file lands at or just below the target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from salomi.packing.model_file import load_quantized

CANDS = "binary,gptq:binary,gptq:ternary,gptq:2:g32,gptq:3:g32,gptq:4:g32"


def test_bpw_target_met_from_the_file(tiny_llama_dir: Path, austen_slice: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.salomi"
    p = subprocess.run([sys.executable, "-m", "salomi.cli", "quantize", "--model", str(tiny_llama_dir), "--bpw", "2.3",
                        "--candidates", CANDS, "--calib", str(austen_slice), "--calib-segments", "4",
                        "--calib-len", "64", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    qf = load_quantized(out)
    assert 2.29 <= qf.linear_bpw <= 2.3
    assert len(set(qf.metadata["recipe"]["layers"].values())) > 1  # really mixed
    assert qf.method == "budget:2.3bpw"
    assert qf.metadata["recipe"]["budget"] == {"damage": "kl", "candidates": CANDS.split(",")}  # kl: the default


def test_unreachable_target_names_the_range(tiny_llama_dir: Path, austen_slice: Path, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "salomi.cli", "quantize", "--model", str(tiny_llama_dir), "--bpw", "0.5",
                        "--candidates", CANDS, "--calib", str(austen_slice), "--calib-segments", "4",
                        "--calib-len", "64", "--out", str(tmp_path / "x.salomi")], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "feasible" in p.stderr and ".." in p.stderr


def test_table_calibration_is_separate(tiny_llama_dir: Path, austen_slice: Path, tmp_path: Path) -> None:
    """--table-segments/--table-seed: the budget's table is measured (and cached) on its own calibration draw,
    the quantization uses --calib-segments/--seed, and the file records both."""
    import json
    import os

    env = {**os.environ, "SALOMI_CACHE": str(tmp_path / "cache")}

    def run(out: Path, *extra: str) -> None:
        p = subprocess.run([sys.executable, "-m", "salomi.cli", "quantize", "--model", str(tiny_llama_dir), "--bpw",
                            "2.3", "--candidates", CANDS, "--calib", str(austen_slice), "--calib-len", "64",
                            "--out", str(out), *extra], capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, p.stderr[-2000:]

    run(tmp_path / "a.salomi", "--calib-segments", "6", "--seed", "1", "--table-segments", "4", "--table-seed", "0")
    tables = sorted((tmp_path / "cache" / "mixed").glob("sens-*.json"))
    assert len(tables) == 1
    info = json.loads(tables[0].read_text())["info"]
    assert (info["segments"], info["seed"]) == (4, 0)
    calib = load_quantized(tmp_path / "a.salomi").metadata["calibration"]
    assert (calib["segments"], calib["seed"], calib["table"]) == (6, 1, {"segments": 4, "seed": 0})
    made = tables[0].stat().st_mtime_ns
    run(tmp_path / "b.salomi", "--calib-segments", "4", "--seed", "0")  # the same table: reused, not re-made
    assert sorted((tmp_path / "cache" / "mixed").glob("sens-*.json")) == tables
    assert tables[0].stat().st_mtime_ns == made
    assert "table" not in load_quantized(tmp_path / "b.salomi").metadata["calibration"]


def test_table_segments_default_to_at_most_16(tiny_llama_dir: Path, austen_slice: Path, tmp_path: Path) -> None:
    """Without --table-segments a budget's table is measured on min(--calib-segments, 16) segments: the set-up of
    every measured budget in docs/RESULTS.md, and one cached table for every larger calibration."""
    import json
    import os

    env = {**os.environ, "SALOMI_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "c.salomi"
    p = subprocess.run([sys.executable, "-m", "salomi.cli", "quantize", "--model", str(tiny_llama_dir), "--bpw", "2.3",
                        "--candidates", CANDS, "--calib", str(austen_slice), "--calib-len", "32", "--calib-segments",
                        "20", "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    (table,) = (tmp_path / "cache" / "mixed").glob("sens-*.json")
    assert json.loads(table.read_text())["info"]["segments"] == 16
    calib = load_quantized(out).metadata["calibration"]
    assert (calib["segments"], calib["table"]) == (20, {"segments": 16, "seed": 0})
