"""BiLLM-style binarization (Huang et al., 2024) with honest storage.

Columns are ranked by Hessian salience sum_r w_rj^2 / [H^-1]_jj^2; the top c columns
(c searched over a few candidates to minimise the diagonal-Hessian error, or given) are
binarized twice (residual: a1*s1 + a2*s2). The other weights of each row are split by a
magnitude threshold (the exact weighted 2-means split of |w| per row) into a
"concentrated" and a "sparse" group, each binarized with its own scale. Every scale is
per row (fp16), fixed before a GPTQ sweep that rounds each column to the nearest of its
row's levels and pushes the error onto the columns not yet done.

Storage (format "billm"): salient-column bitmap, one sign bit per weight, one more bit
per weight (the residual sign in salient columns, the group bit elsewhere) and four fp16
scales per row: ~2 + 64/in bits per weight. Nothing is left out of the count.
"""

from __future__ import annotations

import numpy as np
import torch

from salomi.errors import SalomiError
from salomi.packing.bits import pack_rows, row_bytes, unpack_rows
from salomi.quantizers.base import PackedLinear, Quantizer, StorageFormat, expect, f16, register_format
from salomi.quantizers.gptq import ColumnQuantizer, check_hessian, gptq_sweep, prepare_hessian


@register_format
class BiLLMFormat(StorageFormat):
    """colmask: uint8 [ceil(in/8)] (bit j LSB-first = column j is salient);
    bits, bits2: uint8 [out, ceil(in/8)] (packing.bits rows, 1 bit per weight);
    scale: fp16 [out, 4] = (a1, a2, a_lo, a_hi) per row. With s = 2*bit - 1:
      salient column:      w = a1 * s(bits) + a2 * s(bits2)
      other column:        w = s(bits) * (a_hi if bits2 else a_lo)
    """

    name = "billm"

    def validate(self, p: PackedLinear) -> None:
        o, i = p.shape
        expect(p, "colmask", "uint8", (row_bytes(i, 1),))
        expect(p, "bits", "uint8", (o, row_bytes(i, 1)))
        expect(p, "bits2", "uint8", (o, row_bytes(i, 1)))
        expect(p, "scale", "float16", (o, 4))

    def dequantize(self, p: PackedLinear) -> torch.Tensor:
        o, i = p.shape
        col = torch.from_numpy(unpack_rows(np.asarray(p.tensors["colmask"])[None, :], i, 1)[0].astype(bool))
        s1 = torch.from_numpy(unpack_rows(p.tensors["bits"], i, 1).astype(np.float32)) * 2 - 1
        b2 = torch.from_numpy(unpack_rows(p.tensors["bits2"], i, 1).astype(np.float32))
        sc = torch.from_numpy(np.asarray(p.tensors["scale"], dtype=np.float32))
        sal = sc[:, 0:1] * s1 + sc[:, 1:2] * (2 * b2 - 1)
        rest = s1 * torch.where(b2 > 0, sc[:, 3:4], sc[:, 2:3])
        return torch.where(col[None, :], sal, rest)


def _split_fit(a: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact weighted 2-means of |w| per row (a = |w| [o, m], h = column weights [m]).
    Returns (a_lo, a_hi, error) per row."""
    o, m = a.shape
    if m == 0:
        z = torch.zeros(o, device=a.device)
        return z, z, z
    v, idx = torch.sort(a, dim=1)
    hw = h[idx]
    s0 = torch.cumsum(hw, 1)
    s1 = torch.cumsum(hw * v, 1)
    t0, t1 = s0[:, -1:], s1[:, -1:]
    s2 = (hw * v * v).sum(1)
    lo_n, lo_s = s0[:, :-1], s1[:, :-1]  # split after position k (k = 1 .. m-1 in the low group)
    hi_n, hi_s = t0 - lo_n, t1 - lo_s
    if m > 1:
        err = s2[:, None] - lo_s**2 / lo_n.clamp(min=1e-30) - hi_s**2 / hi_n.clamp(min=1e-30)
        k = err.argmin(dim=1, keepdim=True)
        a_lo = (lo_s.gather(1, k) / lo_n.gather(1, k).clamp(min=1e-30)).squeeze(1)
        a_hi = (hi_s.gather(1, k) / hi_n.gather(1, k).clamp(min=1e-30)).squeeze(1)
        return a_lo, a_hi, err.gather(1, k).squeeze(1)
    mean = (t1 / t0.clamp(min=1e-30)).squeeze(1)
    return mean, mean, s2 - (t1**2 / t0.clamp(min=1e-30)).squeeze(1)


def _salient_fit(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual binarization per row of w [o, c] with column weights h; (a1, a2, error)."""
    o, c = w.shape
    if c == 0:
        z = torch.zeros(o, device=w.device)
        return z, z, z
    hs = h.sum()
    a1 = (w.abs() * h).sum(1) / hs
    r = (w.abs() - a1[:, None]).abs()
    a2 = (r * h).sum(1) / hs
    err = ((r - a2[:, None]) ** 2 * h).sum(1)
    return a1, a2, err


def fit_rows(w: torch.Tensor, h: torch.Tensor, sal: torch.Tensor) -> tuple[torch.Tensor, float]:
    """fp16-rounded scales [o, 4] for a salient-column mask, and the diagonal-weighted error."""
    a1, a2, e1 = _salient_fit(w[:, sal], h[sal])
    lo, hi, e2 = _split_fit(w[:, ~sal].abs(), h[~sal])
    sc = torch.stack([a1, a2, lo, hi], dim=1).to(torch.float16).float()
    return sc, float((e1 + e2).sum())


class BiLLMColumns(ColumnQuantizer):
    def __init__(self, scale: torch.Tensor, sal: torch.Tensor, n: int) -> None:
        self.sc, self.sal = scale, sal.tolist()
        o = scale.shape[0]
        self.b1 = torch.zeros(o, n, dtype=torch.bool, device=scale.device)
        self.b2 = torch.zeros_like(self.b1)

    def quant(self, j: int, w: torch.Tensor) -> torch.Tensor:
        s1 = w >= 0
        sg = s1.float() * 2 - 1
        sc = self.sc
        if self.sal[j]:
            r = w - sc[:, 0] * sg
            s2 = r >= 0
            q = sc[:, 0] * sg + sc[:, 1] * (s2.float() * 2 - 1)
        else:
            s2 = (w.abs() - sc[:, 3]).abs() < (w.abs() - sc[:, 2]).abs()
            q = sg * torch.where(s2, sc[:, 3], sc[:, 2])
        self.b1[:, j], self.b2[:, j] = s1, s2
        return q


class BiLLMQuantizer(Quantizer):
    needs_hessian = True
    CANDIDATES = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4)

    def __init__(self, salient: float | int | None = None, percdamp: float = 0.01) -> None:
        """salient: None = search, int = column count, float in [0, 1] = fraction of columns."""
        if isinstance(salient, float) and not 0.0 <= salient <= 1.0:
            raise SalomiError(f"billm: salient fraction {salient} is outside 0..1")
        self.salient, self.percdamp = salient, percdamp
        self.spec = "billm" if salient is None else f"billm:s{salient}"

    def check_shape(self, shape: tuple[int, int]) -> None:
        if isinstance(self.salient, int) and self.salient > shape[1]:
            raise SalomiError(f"{self.spec}: {self.salient} salient columns but a row has only {shape[1]} weights")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        o, n = weight.shape
        self.check_shape((o, n))
        check_hessian(hessian, n, self.spec)
        w, u, _, hd = prepare_hessian(weight, hessian, self.percdamp)
        hdiag = torch.diag(hd).float()
        hinv_diag = (u * u).sum(0)
        order = torch.argsort((w * w).sum(0) / hinv_diag**2, descending=True, stable=True)
        if self.salient is None:
            counts = sorted({round(f * n) for f in self.CANDIDATES})
        elif isinstance(self.salient, int):
            counts = [self.salient]
        else:
            counts = [round(self.salient * n)]
        best = None
        for c in counts:
            sal = torch.zeros(n, dtype=torch.bool, device=w.device)
            sal[order[:c]] = True
            sc, err = fit_rows(w, hdiag, sal)
            if best is None or err < best[0]:
                best = (err, sal, sc)
        _, sal, sc = best
        cq = BiLLMColumns(sc, sal, n)
        gptq_sweep(w, u, cq)
        tensors = {
            "colmask": pack_rows(sal[None, :].to(torch.uint8).cpu().numpy(), 1)[0],
            "bits": pack_rows(cq.b1.to(torch.uint8).cpu().numpy(), 1),
            "bits2": pack_rows(cq.b2.to(torch.uint8).cpu().numpy(), 1),
            "scale": f16(sc),
        }
        return PackedLinear(self.spec, "billm", (o, n), tensors, {})


def parse_billm(spec: str, *args: str) -> BiLLMQuantizer:
    if not args:
        return BiLLMQuantizer()
    if len(args) != 1 or not args[0].startswith("s"):
        raise TypeError
    v = args[0][1:]
    try:
        return BiLLMQuantizer(int(v)) if v.isdigit() else BiLLMQuantizer(float(v))
    except ValueError:
        raise SalomiError(f"bad method spec {spec!r}: s<N> is a salient column count or a fraction in 0..1") from None
