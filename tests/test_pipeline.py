"""End to end on tiny random models (GPT-2 and Llama architectures, real GPT-2 tokenizer):
quantize -> packed file -> evaluate / inspect / export / generate, with exact bit accounting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from salomi import api
from salomi.evaluation.evaluate import make_windows, perplexity, tokenize
from salomi.loading.models import load_reference
from salomi.packing import container
from salomi.packing.model_file import describe, load_quantized

METHODS = ["binary", "ternary", "rtn:2:g32", "rtn:3:g64", "rtn:4:g32"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request: pytest.FixtureRequest, tiny_gpt2_dir: Path, tiny_llama_dir: Path) -> Path:
    return tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir


@pytest.mark.parametrize("method", METHODS)
def test_quantize_accounting_is_exact(tiny: Path, method: str, tmp_path: Path) -> None:
    out = tmp_path / "m.salomi"
    res = api.quantize(model=str(tiny), method=method, out=out, progress=False)
    qf = load_quantized(out)
    size = out.stat().st_size
    assert res["file_bytes"] == size == qf.file_bytes
    # model bpw is the whole file over the reference's parameters, exactly
    assert qf.model_bpw * qf.reference_params / 8 == pytest.approx(size, abs=1e-6)
    ref = load_reference(str(tiny))
    assert qf.reference_params == sum(p.numel() for p in ref.model.parameters())
    # linear bpw is the bytes of the stored q/ tensors of the linears, nothing else
    c = container.load(out)
    q_bytes = sum(c.nbytes(k) for k in c.tensors if k.startswith("q/"))
    assert qf.linear_bytes == q_bytes
    assert qf.linear_bpw == q_bytes * 8 / qf.linear_weights
    n_linear = sum(p.n_weights for p in qf.packed.values())
    assert n_linear == qf.linear_weights
    assert len(qf.packed) == (4 if "gpt2" in str(tiny) else 7) * 2
    if method == "binary":
        assert 1.0 < qf.linear_bpw < 1.0 + 16 / 64 + 1e-9
    d = describe(qf)
    assert d["linear_bpw"] == qf.linear_bpw and len(d["layers"]) == len(qf.packed)


def test_gptq_style_sequential_path_runs(tiny: Path, austen_slice: Path, tmp_path: Path) -> None:
    """The calibration path (Hessians from block inputs) works on both architectures."""
    from salomi.quantizers.spec import METHODS as TABLE
    from salomi.quantizers.spec import parse_method

    parse_method("binary")  # registers the method table
    if "gptq" not in TABLE:
        pytest.fail("gptq method is not registered")
    out = tmp_path / "g.salomi"
    api.quantize(model=str(tiny), method="gptq:2:g32", out=out, calib=str(austen_slice), segments=4, seg_len=64,
                 progress=False)
    qf = load_quantized(out)
    assert qf.metadata["calibration"]["segments"] == 4
    assert qf.metadata["calibration"]["torch_threads"] == torch.get_num_threads()  # recorded with the file


def test_eval_export_generate(tiny: Path, brown_slice: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.salomi"
    api.quantize(model=str(tiny), method="rtn:3:g32", out=out, progress=False)
    rows = api.evaluate_files([out], text=str(brown_slice), seq_len=128, windows=3, progress=False)
    r = rows[0]
    for key in ["ppl", "ref_ppl", "ratio", "kl", "top1", "linear_bpw", "model_bpw", "tokens", "seq_len", "windows",
                "text", "model", "method", "seconds"]:
        assert key in r
    assert r["tokens"] == 3 * 127 and r["kl"] >= 0 and 0 <= r["top1"] <= 1
    assert math.isclose(r["ratio"], r["ppl"] / r["ref_ppl"])
    # The exported float checkpoint loads with plain transformers and gives the same ppl.
    exp = api.export_dequantized(out, tmp_path / "export")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(exp)
    w = make_windows(tokenize(tok, brown_slice.read_text()), 128, 3)
    assert perplexity(m, w, progress=False) == pytest.approx(r["ppl"], rel=1e-3)
    pieces = list(api.generate(out, "The jury said", max_new_tokens=5, runtime="dequant"))
    assert len(pieces) >= 2 and "tokens/s" in pieces[-1]


def test_quantized_values_survive_the_file(tiny: Path, tmp_path: Path) -> None:
    """What the quantizer produced is exactly what the file gives back."""
    from salomi.loading.models import block_linears, decoder_blocks, linear_weight
    from salomi.quantizers.spec import parse_method

    out = tmp_path / "m.salomi"
    api.quantize(model=str(tiny), method="rtn:2:g32", out=out, progress=False)
    qf = load_quantized(out)
    ref = load_reference(str(tiny))
    q = parse_method("rtn:2:g32")
    blocks = decoder_blocks(ref.model)
    prefix = next(n for n, m in ref.model.named_modules() if m is blocks)
    for i, b in enumerate(blocks):
        for n, mod in block_linears(b).items():
            fresh = q.quantize(linear_weight(mod).float())
            stored = qf.packed[f"{prefix}.{i}.{n}"]
            for k in fresh.tensors:
                assert np.array_equal(fresh.tensors[k], stored.tensors[k])


def test_resume_reuses_finished_layers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.salomi"
    api.quantize(model=str(tiny_llama_dir), method="rtn:2:g32", out=out, progress=False)
    full = load_quantized(out)
    # A checkpoint holding only block 0, with its codes tampered, must be taken as is on resume.
    first = {n: p for n, p in full.packed.items() if ".0." in n}
    tampered = {}
    for n, p in first.items():
        t = {k: np.array(v) for k, v in p.tensors.items()}
        t["codes"] = np.zeros_like(t["codes"])
        tampered[n] = type(p)(p.method, p.format, p.shape, t, p.params)
    api._save_partial(out.with_name(out.name + ".partial"), tampered, "rtn:2:g32")
    out2 = tmp_path / "m2.salomi"
    out2.with_name(out2.name + ".partial").write_bytes(out.with_name(out.name + ".partial").read_bytes())
    api.quantize(model=str(tiny_llama_dir), method="rtn:2:g32", out=out2, resume=True, progress=False)
    resumed = load_quantized(out2)
    for n, p in resumed.packed.items():
        same = np.array_equal(p.tensors["codes"], full.packed[n].tensors["codes"])
        assert same == (n not in first)
    assert not out2.with_name(out2.name + ".partial").exists()


def test_file_model_equals_reference_with_dequantized_weights(tiny: Path, tmp_path: Path) -> None:
    """The model built from the file is the reference with its linears swapped for the stored
    weights: same logits, buffers (rotary frequencies) included, identical on a rebuild."""
    from salomi.loading.models import block_linears, decoder_blocks
    from salomi.packing.model_file import build_model

    out = tmp_path / "m.salomi"
    api.quantize(model=str(tiny), method="rtn:4:g32", out=out, progress=False, float_dtype="float32")
    qf = load_quantized(out)
    ref = load_reference(str(tiny))
    blocks = decoder_blocks(ref.model)
    prefix = next(n for n, m in ref.model.named_modules() if m is blocks)
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for i, b in enumerate(blocks):
            for n, mod in block_linears(b).items():
                w = qf.packed[f"{prefix}.{i}.{n}"].dequantize()
                mod.weight.copy_(w.t() if isinstance(mod, Conv1D) else w)
    ids = torch.randint(0, 50000, (1, 40), generator=torch.Generator().manual_seed(1))
    m1, m2 = build_model(qf), build_model(qf)
    for name, buf in ref.model.named_buffers():
        assert torch.equal(dict(m1.named_buffers())[name], buf), name
    with torch.inference_mode():
        want = ref.model(ids).logits
        got1, got2 = m1(ids).logits, m2(ids).logits
    assert torch.equal(got1, got2)
    torch.testing.assert_close(got1, want, rtol=1e-4, atol=1e-4)


def test_every_format_loads_in_a_fresh_process(tiny_llama_dir: Path, austen_slice: Path, tmp_path: Path) -> None:
    """A reader that never parsed the method still knows its storage format."""
    import subprocess
    import sys

    out = tmp_path / "b.salomi"
    api.quantize(model=str(tiny_llama_dir), method="billm+lowrank:r2", out=out, calib=str(austen_slice), segments=2,
                 seg_len=32, progress=False)
    code = f"from salomi.packing.model_file import load_quantized; print(load_quantized({str(out)!r}).linear_bpw)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-1500:]
    assert float(p.stdout) == pytest.approx(load_quantized(out).linear_bpw)


def test_budget_quantizes_its_own_reference_in_place_with_the_same_bits(tiny_llama_dir: Path, austen_slice: Path,
                                                                         tmp_path: Path) -> None:
    """A budget loads the reference once and quantizes it in place (no second float copy); a reference the caller
    passes in is cloned and left untouched. Both give the same file."""
    from salomi.loading.models import linear_names, linear_weight, load_reference

    kw = dict(model=str(tiny_llama_dir), target_linear_bpw=3.5, candidates=["gptq:2:g32", "gptq:3:g32"],
              calib=str(austen_slice), segments=2, seg_len=32, progress=False)
    ref = load_reference(str(tiny_llama_dir))
    before = {n: linear_weight(m).detach().clone() for layer in linear_names(ref.model).values() for n, m in layer.items()}
    api.quantize(out=tmp_path / "a.salomi", reference=ref, **kw)
    for layer in linear_names(ref.model).values():
        for n, m in layer.items():
            assert torch.equal(linear_weight(m), before[n]), n
    api.quantize(out=tmp_path / "b.salomi", **kw)
    a, b = load_quantized(tmp_path / "a.salomi"), load_quantized(tmp_path / "b.salomi")
    assert a.packed.keys() == b.packed.keys()
    for n, p in a.packed.items():
        for t, v in p.tensors.items():
            assert np.array_equal(np.asarray(v), np.asarray(b.packed[n].tensors[t])), (n, t)
