"""Light tests of bench/llamacpp.py: argument parsing, log parsing and the bpw accounting (no building)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

_PATH = Path(__file__).resolve().parents[1] / "bench" / "llamacpp.py"


@pytest.fixture(scope="module")
def lc():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_llamacpp"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_parser_defaults(lc):
    a = lc.build_parser().parse_args(["quantize"])
    assert a.command == "quantize"
    assert a.threads == 2 and a.jobs == 2
    assert "IQ1_S" in a.types and "TQ1_0" in a.types and a.variants
    assert a.windows == 8 and a.seq_len == 1024
    b = lc.build_parser().parse_args(["accounting", "--types", "iq1_m", "tq2_0", "--no-variants"])
    assert b.types == ["IQ1_M", "TQ2_0"] and not b.variants
    with pytest.raises(SystemExit):
        lc.build_parser().parse_args(["nonsense"])


def test_labels(lc):
    labels = lc.all_labels(("IQ1_S",))
    assert labels == ["Q4_1", "Q4_1-requant", "IQ1_S", "Q4_1+ffn_down=IQ1_S"]
    assert lc.all_labels(("IQ1_S",), variants=False) == ["Q4_1", "Q4_1-requant", "IQ1_S"]


LOG = """\
[   2/ 272]                   blk.0.attn_k.weight - [  576,   192,     1,     1], type =   q4_1, warning: blk.0.attn_k.weight                  - ncols    576 not divisible by 256 (required for type   iq1_s) -> falling back to  iq4_nl
converting to iq4_nl .. size =     0.07 MiB ->     0.06 MiB
[   3/ 272]                blk.0.ffn_down.weight - [ 1536,   576,     1,     1], type =   q4_1, converting to iq1_s .. size =     0.53 MiB ->     0.17 MiB
[   4/ 272]                   blk.0.attn_q.weight - [  576,   576,     1,     1], type =   q4_1, warning: blk.0.attn_q.weight                  - ncols    576 not divisible by 256 (required for type    q2_K) -> falling back to    q4_0
llama_model_quantize_impl: model size  =    93.78 MiB (5.85 BPW)
llama_model_quantize_impl: quant size  =    50.10 MiB (3.12 BPW)
llama_model_quantize_impl: WARNING: 2 of 272 tensor(s) required fallback quantization
"""


def test_parse_fallbacks(lc):
    fb = lc.parse_fallbacks(LOG)
    assert fb["count"] == 2 and fb["reported"] == 2
    assert fb["by_type"] == {"iq1_s->iq4_nl": 1, "q2_K->q4_0": 1}
    assert fb["by_role"] == {"attn_k.weight": 1, "attn_q.weight": 1}
    assert fb["tensors"][0] == {"tensor": "blk.0.attn_k.weight", "ncols": 576, "block": 256,
                                "wanted": "iq1_s", "got": "iq4_nl"}  # fmt: skip
    assert lc.QUANT_SIZE_RE.findall(LOG)[1] == ("quant", "50.10", "3.12")
    assert lc.parse_fallbacks("nothing here")["count"] == 0


def test_accounting_on_synthetic_gguf(lc, tmp_path):
    """Linear bpw counts only the block linears' bytes; model bpw is file bytes over the reference's parameters."""
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    emb = rng.standard_normal((16, 64)).astype(np.float32)
    w.add_tensor("token_embd.weight", emb)  # F32, not a linear
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))  # F32, not a linear
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name in ("attn_q", "ffn_down"):
        x = rng.standard_normal((32, 64)).astype(np.float32)
        w.add_tensor(f"blk.0.{name}.weight", quantize(x, q8), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    n_ref = 16 * 64 + 64 + 2 * 32 * 64
    assert lc.reference_params(path) == n_ref
    acc = lc.account(path, n_ref)
    assert acc["linear_weights"] == 2 * 32 * 64
    assert acc["linear_bytes"] == 2 * 32 * 2 * 34  # Q8_0: 34 bytes per 32 weights
    assert acc["linear_bpw"] == pytest.approx(8.5)
    assert acc["linear_types"] == {"Q8_0": 1.0}
    assert acc["embedding_types"] == {"token_embd.weight": "F32"}
    assert acc["model_bpw"] == pytest.approx(path.stat().st_size * 8 / n_ref)
    assert "8.500" in lc.format_accounting([{"label": "x", "fallback_count": 0, **acc}])


def test_accounting_needs_linears(lc, tmp_path):
    path = tmp_path / "none.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="no linear tensors"):
        lc.account(path, 128)
