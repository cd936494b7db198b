"""PB-LLM (Shang et al., 2023): a fraction F of salient weights kept at 8 bits, the rest binary.

Salience is the OBS-style w^2 / [H^-1]_jj^2; the top F*out*in weights of the layer are
kept as int8 with an fp16 scale per row (or as fp16 with `:fp16`), stored sparsely with
whichever index is cheaper for this layer: a 1-bit-per-weight bitmap, or per-row
escape-coded uint8 column gaps. The other weights are sign x an fp16 per-row scale (the
L2-optimal mean |w| over the row's non-salient weights). A GPTQ sweep (off with
`:noft`) rounds column by column and pushes each column's error onto the later ones.
"""

from __future__ import annotations

import numpy as np
import torch

from salomi.errors import SalomiError
from salomi.packing.bits import pack_rows, row_bytes, unpack_rows
from salomi.quantizers.base import PackedLinear, Quantizer, StorageFormat, expect, f16, register_format
from salomi.quantizers.gptq import ColumnQuantizer, check_hessian, gptq_sweep, prepare_hessian

ESC = 255


def encode_gaps(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise gap code of a boolean [o, n] mask: (entries uint8 [E], entries per row [o])."""
    o, n = mask.shape
    rows, cols = np.nonzero(mask)
    if cols.size == 0:
        return np.zeros(0, np.uint8), np.zeros(o, np.int64)
    same = np.r_[False, rows[1:] == rows[:-1]]
    prev = np.where(same, np.r_[0, cols[:-1] + 1], 0)
    gap = cols - prev
    per = gap // ESC + 1
    entries = np.full(int(per.sum()), ESC, dtype=np.uint8)
    entries[np.cumsum(per) - 1] = gap % ESC
    counts = np.bincount(rows, weights=per, minlength=o).astype(np.int64)
    return entries, counts


def decode_gaps(entries: np.ndarray, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of encode_gaps: (rows, cols) of the coded positions, row-major; SalomiError if corrupt."""
    counts = np.asarray(counts, dtype=np.int64)
    e = np.asarray(entries, dtype=np.int64)
    if int(counts.sum()) != e.size or (counts < 0).any():
        raise SalomiError("packed pbllm layer: gap-code entry counts do not add up (corrupt)")
    if e.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    row = np.repeat(np.arange(counts.size), counts)
    inc = np.where(e == ESC, ESC, e + 1)
    cum = np.cumsum(inc)
    start = np.r_[0, np.cumsum(counts)[:-1]]
    base = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0)
    cum = cum - np.repeat(base, counts)
    emit = e != ESC
    cols = cum[emit] - 1
    if cols.size and int(cols.max()) >= n:
        raise SalomiError("packed pbllm layer: a gap-coded column index runs past the row (corrupt)")
    return row[emit], cols


@register_format
class PBLLMFormat(StorageFormat):
    """w = scale[r] * (2*bit - 1) off the salient set; salient weights stored explicitly.

    bits: uint8 [out, ceil(in/8)] sign bits (packing.bits rows; ignored at salient places);
    scale: fp16 [out]. Salient set (params index): "bitmap" -> sal_mask uint8 [out, ceil(in/8)];
    "gaps" -> sal_gaps uint8 [E], sal_count uint16 [out] (entries per row): reading a row
    from column c = 0, an entry 255 advances c by 255, any other entry e advances c by e,
    marks column c salient, then c += 1. Salient values in row-major order (params
    values): "int8" -> sal_q int8 [nnz] times sal_scale fp16 [out] of its row; "fp16" -> sal_val fp16 [nnz].
    """

    name = "pbllm"

    def positions(self, p: PackedLinear) -> tuple[np.ndarray, np.ndarray]:
        o, i = p.shape
        if p.params.get("index") == "bitmap":
            m = unpack_rows(expect(p, "sal_mask", "uint8", (o, row_bytes(i, 1))), i, 1)
            return np.nonzero(m)
        if p.params.get("index") != "gaps":
            raise SalomiError(f"packed pbllm layer has unknown index kind {p.params.get('index')!r}")
        g = p.tensors.get("sal_gaps")
        if g is None or g.dtype != np.uint8 or g.ndim != 1:
            raise SalomiError("packed pbllm layer: sal_gaps must be a 1-D uint8 array")
        return decode_gaps(g, expect(p, "sal_count", "uint16", (o,)), i)

    def values(self, p: PackedLinear, rows: np.ndarray) -> np.ndarray:
        o, _ = p.shape
        nnz = rows.size
        if p.params.get("values") == "fp16":
            return np.asarray(expect(p, "sal_val", "float16", (nnz,)), dtype=np.float32)
        q = expect(p, "sal_q", "int8", (nnz,)).astype(np.float32)
        return q * np.asarray(expect(p, "sal_scale", "float16", (o,)), dtype=np.float32)[rows]

    def validate(self, p: PackedLinear) -> None:
        o, i = p.shape
        expect(p, "bits", "uint8", (o, row_bytes(i, 1)))
        expect(p, "scale", "float16", (o,))
        rows, _ = self.positions(p)
        self.values(p, rows)

    def dequantize(self, p: PackedLinear) -> torch.Tensor:
        o, i = p.shape
        s = unpack_rows(p.tensors["bits"], i, 1).astype(np.float32) * 2 - 1
        w = s * np.asarray(p.tensors["scale"], dtype=np.float32)[:, None]
        rows, cols = self.positions(p)
        w[rows, cols] = self.values(p, rows)
        return torch.from_numpy(w)


class PBColumns(ColumnQuantizer):
    def __init__(self, mask: torch.Tensor, scale: torch.Tensor, sal_scale: torch.Tensor | None) -> None:
        self.mask, self.scale, self.ss = mask, scale, sal_scale
        self.signs = torch.zeros_like(mask)
        self.vals = torch.zeros(mask.shape, device=mask.device)  # int8 codes, or fp16-exact values

    def quant(self, j: int, w: torch.Tensor) -> torch.Tensor:
        m = self.mask[:, j]
        sg = w >= 0
        self.signs[:, j] = sg & ~m
        b = self.scale * (sg.float() * 2 - 1)
        if self.ss is None:
            s = w.to(torch.float16).float()
            self.vals[:, j] = s
        else:
            c = torch.clamp(torch.round(w / self.ss), -127, 127)
            self.vals[:, j] = c
            s = c * self.ss
        return torch.where(m, s, b)


class PBLLMQuantizer(Quantizer):
    needs_hessian = True

    def __init__(self, fraction: float, values: str = "int8", feedback: bool = True, percdamp: float = 0.01) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise SalomiError(f"pbllm: salient fraction {fraction} is outside 0..1")
        self.f, self.values, self.feedback, self.percdamp = fraction, values, feedback, percdamp
        self.spec = f"pbllm:{fraction:g}" + (":fp16" if values == "fp16" else "") + ("" if feedback else ":noft")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        o, n = weight.shape
        check_hessian(hessian, n, self.spec)
        w, u, _, _ = prepare_hessian(weight, hessian, self.percdamp)
        hinv_diag = (u * u).sum(0)
        score = (w * w) / hinv_diag[None, :] ** 2
        nnz = round(self.f * o * n)
        mask = torch.zeros(o * n, dtype=torch.bool, device=w.device)
        if nnz:
            mask[torch.topk(score.flatten(), nnz, sorted=False).indices] = True
        mask = mask.reshape(o, n)
        keep = (~mask).float()
        scale = ((w.abs() * keep).sum(1) / keep.sum(1).clamp(min=1)).to(torch.float16).float()
        ss = None
        if self.values == "int8":
            ss = ((w.abs() * mask).amax(1) / 127).clamp(min=1e-8).to(torch.float16).float().clamp(min=6.1e-8)
        cq = PBColumns(mask, scale, ss)
        if self.feedback:
            gptq_sweep(w, u, cq)
        else:
            for j in range(n):
                cq.quant(j, w[:, j])
        tensors = {"bits": pack_rows(cq.signs.to(torch.uint8).cpu().numpy(), 1), "scale": f16(scale)}
        mask_np = mask.cpu().numpy()
        entries, counts = encode_gaps(mask_np)
        params = {"values": self.values}
        if n <= 65000 and entries.nbytes + 2 * o < o * row_bytes(n, 1):
            tensors["sal_gaps"], tensors["sal_count"] = entries, counts.astype(np.uint16)
            params["index"] = "gaps"
        else:
            tensors["sal_mask"] = pack_rows(mask_np.astype(np.uint8), 1)
            params["index"] = "bitmap"
        if self.values == "int8":
            tensors["sal_q"] = cq.vals[mask].to(torch.int8).cpu().numpy()
            tensors["sal_scale"] = f16(ss)
        else:
            tensors["sal_val"] = f16(cq.vals[mask])
        return PackedLinear(self.spec, "pbllm", (o, n), tensors, params)


def parse_pbllm(spec: str, *args: str) -> PBLLMQuantizer:
    from salomi.quantizers.spec import float_arg

    if not args or any(a not in ("fp16", "noft") for a in args[1:]):
        raise TypeError
    return PBLLMQuantizer(
        float_arg(spec, args[0], 0.0, 1.0), "fp16" if "fp16" in args[1:] else "int8", "noft" not in args[1:]
    )
