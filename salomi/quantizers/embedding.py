"""Quantized token embeddings (and the tied output head they double as).

The embedding table [vocab, d] is stored like any packed linear [out=vocab, in=d], so a
tied head runs through the same kernels as the block linears, and a lookup dequantizes
only the rows it needs. Only formats whose rows decode independently qualify (K-bit
groups: `rtn:K:gG`, `gptq:K:gG`, optionally +ls): llama.cpp stores its embeddings the same
way (Q8_0/Q4_K/Q6_K). GPTQ methods use the Hessian of the head's input (the final
hidden states on calibration text), which is what a tied table's error costs at the output.

Names of the embedding modules come from the model itself (get_input_embeddings /
get_output_embeddings), so every architecture `transformers` loads is covered.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from salomi.errors import SalomiError
from salomi.quantizers.base import PackedLinear, Quantizer

EMBED_FORMATS = ("grid",)
_ROW_TENSORS = {"grid": ("codes", "scale", "zero")}


def parse_embed_method(spec: str) -> Quantizer:
    from salomi.quantizers.spec import parse_method

    q = parse_method(spec)
    if not (spec.startswith("rtn:") or spec.startswith("gptq:")) or ":act" in spec or "+lowrank" in spec \
            or "+rot" in spec or spec.split(":")[1] in ("binary", "ternary"):
        raise SalomiError(
            f"--embed {spec!r}: embeddings take K-bit group methods whose rows decode on their own "
            f"(rtn:K:gG or gptq:K:gG, optionally +ls), e.g. --embed rtn:4:g64"
        )
    return q


def same_bytes_rtn(spec: str) -> Quantizer:
    """RTN on the grid of an embedding spec: the same tensors and bytes, instantly (for byte budgets)."""
    import re

    from salomi.quantizers.simple import RTNQuantizer

    parse_embed_method(spec)
    m = re.match(r"(?:rtn|gptq):(\d+):g(\d+)", spec)
    if not m:
        raise SalomiError(f"--embed {spec!r}: expected rtn:K:gG or gptq:K:gG")
    return RTNQuantizer(int(m.group(1)), int(m.group(2)))


def embedding_names(model: nn.Module) -> dict[str, str]:
    """{"input": name, "output": name or ""}; output is "" when the head is tied to the input table."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: n for n, m in model.named_modules()}
    if inp not in names:
        raise SalomiError("this model has no input embedding module; drop --embed")
    tied = out is None or out.weight is inp.weight
    return {"input": names[inp], "output": "" if tied else names[out]}


def dequantize_rows(p: PackedLinear, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of p.dequantize(), decoding only those rows."""
    if p.format not in _ROW_TENSORS:
        raise SalomiError(f"packed embedding has format {p.format!r}; embeddings take {', '.join(EMBED_FORMATS)}")
    idx = rows.cpu().numpy()
    tensors = {k: (np.asarray(v)[idx] if k in _ROW_TENSORS[p.format] else v) for k, v in p.tensors.items()}
    sub = PackedLinear(p.method, p.format, (len(idx), p.shape[1]), tensors, p.params)
    return sub.dequantize()


class QuantEmbedding(nn.Module):
    """nn.Embedding whose table lives only in packed form; a lookup decodes just the rows it needs."""

    def __init__(self, packed: PackedLinear) -> None:
        super().__init__()
        if packed.format not in EMBED_FORMATS:
            raise SalomiError(f"packed embedding has format {packed.format!r}; expected one of {EMBED_FORMATS}")
        self.packed = packed
        self.num_embeddings, self.embedding_dim = packed.shape

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.packed.method}, {self.packed.bpw:.3f} bpw"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup_rows(ids, self.num_embeddings, self.embedding_dim, lambda rows: dequantize_rows(self.packed, rows))


def lookup_rows(ids: torch.Tensor, vocab: int, dim: int, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Embedding lookup that decodes each distinct token's row once: decode(unique ids) -> [n, dim]."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise IndexError(f"token id out of range for a vocabulary of {vocab}")
    uniq, inv = torch.unique(ids.reshape(-1), return_inverse=True)
    return decode(uniq).to(ids.device)[inv].reshape(*ids.shape, dim)


@torch.no_grad()
def head_hessian(model: nn.Module, segments: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """H = 2/n sum x x^T over the head's inputs (final hidden states) on calibration segments."""
    from salomi.calibration.sequential import accumulate_hessians, run_batches

    head = model.get_output_embeddings()
    if head is None:
        raise SalomiError("this model has no output head; quantize its embeddings without a Hessian (rtn:K:gG)")
    with accumulate_hessians({"head": head}, stop=True, dtype=torch.float64) as hs:
        run_batches(model, segments, batch)
    return hs["head"].float().cpu()


def quantize_embeddings(model: nn.Module, quantizer: Quantizer, segments: torch.Tensor | None) -> dict[str, PackedLinear]:
    """Pack the input embedding (and an untied head) of `model` with `quantizer`.

    A tied table is quantized against the head's input Hessian; an untied input table, whose
    error reaches the output only through the blocks, against the identity."""
    names = embedding_names(model)
    hess = None
    if quantizer.needs_hessian:
        if segments is None:
            raise SalomiError("--embed with a GPTQ method needs calibration text")
        hess = head_hessian(model, segments)
    inp = model.get_input_embeddings().weight.detach().float()
    out: dict[str, PackedLinear] = {}
    if names["output"]:
        eye = torch.eye(inp.shape[1]) if quantizer.needs_hessian else None
        out[names["input"]] = quantizer.quantize(inp, eye)
        out[names["output"]] = quantizer.quantize(model.get_output_embeddings().weight.detach().float(), hess)
    else:
        out[names["input"]] = quantizer.quantize(inp, hess)
    return out
