"""On the real default model (SmolLM2-135M from its GGUF), with few short windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from salomi import api
from salomi.evaluation.evaluate import make_windows, tokenize
from salomi.loading.models import load_reference
from salomi.packing.model_file import load_quantized


@pytest.fixture(scope="module")
def ref():
    return load_reference("smollm2")


def test_reference_matches_plain_transformers(ref) -> None:
    """Our protocol's reference ppl equals an independent computation straight from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from salomi.assets import ensure
    from salomi.data.texts import load_text

    gguf = ensure("smollm2")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text = load_text("brown")
    ids = tok(text[:200_000], add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(2):
            chunk = torch.tensor(ids[i * 512 : (i + 1) * 512])[None]
            loss = F.cross_entropy(plain(chunk).logits[0, :-1], chunk[0, 1:], reduction="sum")
            nll += loss.item()
            n += 511
    plain_ppl = math.exp(nll / n)
    ours = api.evaluate_reference("smollm2", "brown", seq_len=512, windows=2, progress=False, reference=ref)
    assert ours["ppl"] == pytest.approx(plain_ppl, rel=1e-4)
    assert 5 < ours["ppl"] < 200


def test_binary_bpw_just_above_one(ref, tmp_path) -> None:
    out = tmp_path / "b.salomi"
    api.quantize(model="smollm2", method="binary", out=out, reference=ref, progress=False)
    qf = load_quantized(out)
    # sign bits + one fp16 scale per row: 1 + 16/576 for 576-wide rows, 1 + 16/1536 for down_proj
    assert 1.0 < qf.linear_bpw < 1.03
    assert qf.linear_weights == 106_168_320 and qf.reference_params == 134_515_008
    assert qf.model_bpw * qf.reference_params / 8 == pytest.approx(out.stat().st_size, abs=1e-6)
    rows = api.evaluate_files([out], text="brown", seq_len=256, windows=1, progress=False, reference=ref)
    assert rows[0]["ratio"] > 1 and rows[0]["kl"] > 0


def test_exported_checkpoint_same_ppl(ref, tmp_path) -> None:
    out = tmp_path / "r.salomi"
    api.quantize(model="smollm2", method="rtn:4:g64", out=out, reference=ref, progress=False)
    r = api.evaluate_files([out], text="brown", seq_len=256, windows=2, progress=False, reference=ref)[0]
    exp = api.export_dequantized(out, tmp_path / "hf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from salomi.data.texts import load_text
    from salomi.evaluation.evaluate import perplexity

    m = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(exp)
    w = make_windows(tokenize(tok, load_text("brown")), 256, 2)
    assert perplexity(m, w, progress=False) == pytest.approx(r["ppl"], rel=1e-3)
    assert 1.0 < r["ratio"] < 2.0  # 4-bit groups of 64 are close to the (4-bit) reference
