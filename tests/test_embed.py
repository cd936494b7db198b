"""--embed: packed token embeddings / tied head, counted in model bpw and run from the packed table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from salomi import api
from salomi.errors import SalomiError
from salomi.packing import container
from salomi.packing.model_file import build_model, describe, load_quantized
from salomi.quantizers.embedding import QuantEmbedding, dequantize_rows, parse_embed_method


@pytest.fixture(scope="module")
def embed_files(tiny_llama_dir: Path, austen_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("embed")
    out = {}
    for name, embed in (("plain", None), ("rtn4", "rtn:4:g32"), ("gptq4", "gptq:4:g32")):
        out[name] = d / f"{name}.salomi"
        api.quantize(model=str(tiny_llama_dir), method="rtn:2:g32", out=out[name], calib=str(austen_slice),
                     segments=4, seg_len=64, progress=False, embed=embed)
    return out


def test_packed_embedding_shrinks_the_file_not_the_linear_bpw(embed_files: dict[str, Path]) -> None:
    plain, rtn4 = load_quantized(embed_files["plain"]), load_quantized(embed_files["rtn4"])
    assert rtn4.linear_bytes == plain.linear_bytes and rtn4.linear_weights == plain.linear_weights
    emb = rtn4.embeddings["model.embed_tokens"]
    assert emb.shape == (50257, 64) and emb.format == "grid"
    # the fp16 table (50257 x 64 x 2 bytes) is replaced by 4-bit codes + fp16 scale/zero per 32
    assert emb.nbytes == 50257 * (64 * 4 // 8 + 2 * 2 * 2)
    assert plain.file_bytes - rtn4.file_bytes > 50257 * 64 * 2 - emb.nbytes - 4096
    assert rtn4.model_bpw * rtn4.reference_params / 8 == rtn4.file_bytes
    assert "f/model.embed_tokens.weight" not in container.load(embed_files["rtn4"]).tensors
    assert [e["name"] for e in describe(rtn4)["embeddings"]] == ["model.embed_tokens"]


@pytest.mark.parametrize("name", ["rtn4", "gptq4"])
def test_model_runs_from_the_packed_table_and_stays_close(embed_files: dict[str, Path], name: str) -> None:
    qf = load_quantized(embed_files[name])
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = build_model(load_quantized(embed_files["plain"]), "dequant")
    with torch.no_grad():
        outs = [build_model(qf, rt)(ids).logits for rt in ("dequant", "kernels")]
        base = ref(ids).logits
    m = build_model(qf, "dequant")
    assert isinstance(m.get_input_embeddings(), QuantEmbedding)
    assert torch.allclose(outs[0], outs[1], atol=1e-3, rtol=1e-3)  # kernels vs dequantize path
    rel = float((outs[0] - base).norm() / base.norm())
    assert 0 < rel < 0.2  # 4-bit table: changed, but not broken


def test_rows_decode_alone_exactly_as_the_whole_table(embed_files: dict[str, Path]) -> None:
    emb = load_quantized(embed_files["rtn4"]).embeddings["model.embed_tokens"]
    rows = torch.tensor([0, 7, 50256, 7])
    assert torch.equal(dequantize_rows(emb, rows), emb.dequantize()[rows])
    with pytest.raises(IndexError):
        QuantEmbedding(emb)(torch.tensor([50257]))


def test_export_and_generate_with_packed_embeddings(embed_files: dict[str, Path], tmp_path: Path) -> None:
    out = api.export_dequantized(embed_files["rtn4"], tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out)
    emb = load_quantized(embed_files["rtn4"]).embeddings["model.embed_tokens"]
    assert torch.equal(plain.get_input_embeddings().weight.detach(), emb.dequantize())
    pieces = list(api.generate(embed_files["rtn4"], "Hello there", max_new_tokens=4))
    assert "tokens/s" in pieces[-1]


def test_embed_rejects_methods_whose_rows_do_not_decode_alone() -> None:
    for spec in ("binary", "vq:d4:k16", "gptq:2:g32:act", "rtn:4:g32+rot", "gptq:binary"):
        with pytest.raises(SalomiError, match="--embed"):
            parse_embed_method(spec)


def test_embed_command_packs_an_existing_file_keeping_its_linears(embed_files: dict[str, Path], tmp_path: Path) -> None:
    from salomi.cli import main

    out = tmp_path / "e.salomi"
    assert main(["embed", str(embed_files["plain"]), "--method", "rtn:4:g32", "--out", str(out)]) == 0
    a, b = load_quantized(embed_files["plain"]), load_quantized(out)
    assert b.linear_bytes == a.linear_bytes and b.reference_params == a.reference_params
    for n, p in a.packed.items():
        for t, arr in p.tensors.items():
            assert (arr == b.packed[n].tensors[t]).all()
    same = load_quantized(embed_files["rtn4"])  # packed at quantize time with the same method
    assert b.file_bytes < a.file_bytes and abs(b.file_bytes - same.file_bytes) < 2048
    # the file holds the fp16-rounded table, quantize time the float32 one: the same grid up to that rounding
    # (a code may flip where the fp16 rounding crosses a rounding boundary: rare)
    diff = (b.embeddings["model.embed_tokens"].dequantize() - same.embeddings["model.embed_tokens"].dequantize()).abs()
    assert float((diff > 2e-4).float().mean()) < 0.01
    with pytest.raises(SalomiError, match="packed already"):
        api.pack_embeddings(out, "rtn:4:g32", tmp_path / "again.salomi")


def test_head_hessian_is_the_scaled_gram_of_the_final_hidden_states(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from salomi.quantizers.embedding import head_hessian

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), torch_dtype=torch.float32).eval()
    segs = torch.randint(0, model.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model(segs, output_hidden_states=True).hidden_states[-1].reshape(-1, model.config.hidden_size)
    expect = (2.0 / x.shape[0]) * (x.double().T @ x.double())
    got = head_hessian(model, segs, batch=2)
    assert got.dtype == torch.float32 and got.shape == expect.shape
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)
