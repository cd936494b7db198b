"""User errors end in one line that names the problem, exit code 2, and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "salomi.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(p: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("salomi: error:")]
    assert len(lines) == 1, p.stderr
    assert pattern.lower() in lines[0].lower(), lines[0]


def test_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(run("inspect", str(tmp_path / "nope.salomi")), "no such file")


def test_truncated_file(packed: Path, tmp_path: Path) -> None:
    bad = tmp_path / "t.salomi"
    bad.write_bytes(packed.read_bytes()[:-100])
    assert_one_line_error(run("inspect", str(bad)), "truncated")


def test_edited_header(packed: Path, tmp_path: Path) -> None:
    bad = tmp_path / "h.salomi"
    bad.write_bytes(packed.read_bytes().replace(b'"rtn:2:g32"', b'"rtn:3:g32"', 1))
    assert_one_line_error(run("inspect", str(bad)), "header checksum")


def test_checksum_mismatch(packed: Path, tmp_path: Path) -> None:
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0x55
    bad = tmp_path / "c.salomi"
    bad.write_bytes(bytes(data))
    assert_one_line_error(run("inspect", str(bad)), "checksum mismatch")


def test_unknown_method(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("quantize", "--model", str(tiny_llama_dir), "--method", "magic:1",
                              "--out", str(tmp_path / "x.salomi")), "unknown method")


def test_bad_method_args(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("quantize", "--model", str(tiny_llama_dir), "--method", "rtn:two:g64",
                              "--out", str(tmp_path / "x.salomi")), "bad method spec")


def test_group_not_dividing(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("quantize", "--model", str(tiny_llama_dir), "--method", "rtn:2:g48",
                              "--out", str(tmp_path / "x.salomi")), "does not divide")


def test_empty_text(packed: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run("eval", str(packed), "--text", str(empty), "--windows", "1"), "empty")


def test_text_too_short(packed: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert_one_line_error(run("eval", str(packed), "--text", str(short), "--windows", "1"), "shorter than one window")


def test_not_a_causal_lm(tmp_path: Path) -> None:
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert_one_line_error(run("quantize", "--model", str(d), "--method", "binary", "--out", str(tmp_path / "x")),
                          "not a causal language model")


def test_directory_without_config(tmp_path: Path) -> None:
    assert_one_line_error(run("quantize", "--model", str(tmp_path), "--method", "binary",
                              "--out", str(tmp_path / "x")), "config.json")


def test_not_a_salomi_file(tmp_path: Path) -> None:
    f = tmp_path / "x.salomi"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    assert_one_line_error(run("eval", str(f)), "magic")


def test_int8_activations_need_the_engine(packed: Path) -> None:
    p = run("eval", str(packed), "--runtime", "dequant", "--activations", "int8", "--windows", "1", "--seq-len", "32")
    assert_one_line_error(p, "needs the native engine")


def test_bench_rounds_below_one() -> None:
    assert_one_line_error(run("bench", "--rounds", "0"), "--rounds must be >= 1")
