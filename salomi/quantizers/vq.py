"""Hessian-weighted vector quantization with GPTQ-style error feedback (GPTVQ-like).

Each row is normalised by an fp16 scale (its RMS) and cut into vectors of d consecutive
weights; one per-layer codebook of k fp16 vectors is fitted by k-means in which each
coordinate is weighted by the Hessian diagonal of its column (times the row scale^2, so
the k-means objective is the diagonal approximation of the layer's output error).
k-means is seeded by weighted k-means++ (k <= 1024; a seeded random sample above) and
runs a fixed number of iterations on a fixed seeded subset, so the result depends only
on `seed`. Then the vector columns are assigned left to right like GPTQ: the d columns
of a vector column are matched jointly under the metric of the remaining inverse
Hessian, and their error is spread over the columns not yet quantized. Finally each
centroid is re-fitted to the (error-updated) vectors assigned to it under the same
metric and the assignment pass is repeated; the second result is kept only if the
layer's output error tr(dW H dW^T) drops. bpw = ceil(log2 k)/d plus
the codebook (16*k*d bits per layer) and one fp16 scale per row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from salomi.errors import SalomiError
from salomi.packing.bits import pack_rows, row_bytes, unpack_rows
from salomi.quantizers.base import PackedLinear, Quantizer, StorageFormat, expect, f16, register_format
from salomi.quantizers.gptq import check_hessian, prepare_hessian


def code_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """packing.bits row layout (code j at bits [j*b, (j+1)*b), LSB first) for b = 1..16."""
    if bits <= 8:
        return pack_rows(codes.astype(np.uint8), bits)
    c = np.ascontiguousarray(codes, dtype=np.uint16)
    rows, n = c.shape
    planes = ((c[:, :, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8).reshape(rows, n * bits)
    return np.packbits(planes, axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    if bits <= 8:
        return unpack_rows(packed, n, bits)
    rows = packed.shape[0]
    flat = np.unpackbits(np.ascontiguousarray(packed, dtype=np.uint8), axis=1, bitorder="little", count=n * bits)
    planes = flat.reshape(rows, n, bits).astype(np.uint32)
    return (planes << np.arange(bits, dtype=np.uint32)).sum(axis=2).astype(np.uint16)


@register_format
class VQFormat(StorageFormat):
    """w[r, v*d:(v+1)*d] = scale[r] * codebook[code[r, v]], v = 0 .. in/d - 1.

    params: d (vector length, divides in), k (codebook entries, 2..65536).
    codes: uint8 [out, ceil(in/d * b / 8)] with b = max(1, ceil(log2 k)) bits per code,
    each row a little-endian bit stream exactly as packing.bits (code v at bits
    [v*b, (v+1)*b), LSB first, row padded with zero bits) -- for b <= 8 this is
    pack_rows, for b = 9..16 the same rule continued. Every code must be < k.
    codebook: fp16 [k, d]; scale: fp16 [out].
    """

    name = "vq"

    def _codes(self, p: PackedLinear) -> np.ndarray:
        o, i = p.shape
        d, k = int(p.params["d"]), int(p.params["k"])
        nv = i // d
        b = code_bits(k)
        return unpack_codes(expect(p, "codes", "uint8", (o, row_bytes(nv, b))), nv, b)

    def validate(self, p: PackedLinear) -> None:
        o, i = p.shape
        d, k = int(p.params["d"]), int(p.params["k"])
        if d < 1 or i % d or not 2 <= k <= 65536:
            raise SalomiError(f"packed vq layer has bad parameters d={d}, k={k} for rows of {i}")
        codes = self._codes(p)
        if codes.size and int(codes.max()) >= k:
            raise SalomiError(f"packed vq layer has a code {int(codes.max())} >= codebook size {k} (corrupt)")
        expect(p, "codebook", "float16", (k, d))
        expect(p, "scale", "float16", (o,))

    def dequantize(self, p: PackedLinear) -> torch.Tensor:
        o, i = p.shape
        codes = torch.from_numpy(self._codes(p).astype(np.int64))
        cb = torch.from_numpy(np.asarray(p.tensors["codebook"], dtype=np.float32))
        scale = torch.from_numpy(np.asarray(p.tensors["scale"], dtype=np.float32))
        return cb[codes].reshape(o, i) * scale[:, None]


# ---------------------------------------------------------------- k-means


def _nearest(x: torch.Tensor, c: torch.Tensor, wx: torch.Tensor | None = None, chunk: int = 1 << 20) -> torch.Tensor:
    """argmin_c sum_i w_i (x_i - c_i)^2 for each row of x (w = wx per row, or 1); one matmul per chunk."""
    n, d = x.shape
    k = c.shape[0]
    out = torch.empty(n, dtype=torch.long, device=x.device)
    rows = max(1, chunk // max(k, 1))
    if wx is None:
        cm = torch.cat([-2 * c.T, (c * c).sum(1)[None, :]], dim=0)  # [d+1, k]
    else:
        cm = torch.cat([(c * c).T, -2 * c.T], dim=0)  # [2d, k]
    for s in range(0, n, rows):
        xs = x[s : s + rows]
        if wx is None:
            feat = torch.cat([xs, torch.ones(xs.shape[0], 1, device=x.device)], dim=1)
        else:
            ws = wx[s : s + rows]
            feat = torch.cat([ws, ws * xs], dim=1)
        out[s : s + rows] = _argmin_rows(feat @ cm)
    return out


def _argmin_rows(dist: torch.Tensor) -> torch.Tensor:
    if dist.device.type == "cpu":  # numpy's argmin is several times faster than torch's on CPU
        return torch.from_numpy(np.argmin(dist.numpy(), axis=1))
    return dist.argmin(dim=1)


def unit_mean(wx: torch.Tensor) -> torch.Tensor:
    """wx / mean(wx), the mean taken by numpy's pairwise sum in float64: one fixed order, where
    torch's parallel mean rounds differently on 1 and 2 threads (from ~10^6 elements), and a
    one-ulp change of the k-means weights was enough to give a budget file other codes."""
    return wx / float(np.mean(wx.detach().cpu().numpy(), dtype=np.float64))


def _kmeanspp(x: torch.Tensor, wx: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ seeding on x [m >= k, d]: each new centre drawn with probability
    proportional to its (weighted) distance to the nearest centre so far."""
    m = x.shape[0]
    idx = torch.empty(k, dtype=torch.long)
    idx[0] = int(torch.randint(m, (1,), generator=gen))
    best = ((x - x[idx[0]]) ** 2 * wx).sum(1)
    for i in range(1, k):
        p = best.clamp(min=0).cpu().double()
        total = float(p.sum())
        j = (
            int(torch.multinomial(p / total, 1, generator=gen))
            if total > 0
            else int(torch.randint(m, (1,), generator=gen))
        )
        idx[i] = j
        best = torch.minimum(best, ((x - x[j]) ** 2 * wx).sum(1))
    return x[idx.to(x.device)].clone()


def weighted_kmeans(
    x: torch.Tensor, wx: torch.Tensor, k: int, iters: int, seed: int, sample: int = 1 << 30
) -> torch.Tensor:
    """k-means on rows of x [N, d] with per-coordinate weights wx [N, d]; returns [k, d]."""
    n, d = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(n, generator=gen).to(x.device)
    if k <= 1024:  # k-means++ seeding on a subset (cost k passes over 16k vectors)
        c = _kmeanspp(x[order[: min(n, 16 * k)]], wx[order[: min(n, 16 * k)]], k, gen)
    else:
        c = x[order[:k]].clone()
    if n > sample:  # fit on a fixed random subset (enough vectors per centroid), for speed
        x, wx = x[order[:sample]], wx[order[:sample]]
    for _ in range(iters):
        a = _nearest(x, c, wx)
        num = torch.zeros(k, d, device=x.device).index_add_(0, a, wx * x)
        den = torch.zeros(k, d, device=x.device).index_add_(0, a, wx)
        ok = den > 0
        c = torch.where(ok, num / den.clamp(min=1e-30), c)
    return c


# ---------------------------------------------------------------- quantizer


class VQQuantizer(Quantizer):
    needs_hessian = True

    def __init__(
        self,
        d: int,
        k: int,
        feedback: bool = True,
        iters: int = 12,
        seed: int = 0,
        percdamp: float = 0.01,
        refine: bool = True,
    ):
        if not 2 <= d <= 8:
            raise SalomiError(f"vq: vector length d={d} must be 2..8")
        if not 2 <= k <= 65536:
            raise SalomiError(f"vq: codebook size k={k} must be 2..65536")
        self.d, self.k, self.feedback, self.iters, self.seed, self.percdamp = d, k, feedback, iters, seed, percdamp
        self.refine = refine
        self.spec = f"vq:d{d}:k{k}" + ("" if feedback else ":noft")

    def check_shape(self, shape: tuple[int, int]) -> None:
        o, i = shape
        if i % self.d:
            raise SalomiError(f"{self.spec}: vector length {self.d} does not divide a row of {i} weights")
        if self.k > o * i // self.d:
            raise SalomiError(
                f"{self.spec}: codebook of {self.k} entries exceeds the {o * i // self.d} vectors of a {o}x{i} layer"
            )

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        o, n = weight.shape
        self.check_shape((o, n))
        check_hessian(hessian, n, self.spec)
        d, k = self.d, self.k
        nv = n // d
        w, u, _, hd = prepare_hessian(weight, hessian, self.percdamp)
        scale = w.pow(2).mean(dim=1).sqrt().clamp(min=1e-6).to(torch.float16).float().clamp(min=6.1e-5)
        xn = w / scale[:, None]
        hdiag = torch.diag(hd).float()
        wx = (scale[:, None] ** 2 * hdiag[None, :]).reshape(o * nv, d)
        wx = unit_mean(wx)
        cb = weighted_kmeans(xn.reshape(o * nv, d), wx, k, self.iters, self.seed, sample=max(1 << 15, 64 * k))
        cb = cb.to(torch.float16).float()
        if not self.feedback:
            codes = _nearest(xn.reshape(o * nv, d), cb, wx).reshape(o, nv)
        else:
            codes, xs = _gptq_pass(w, u, scale, cb, d)
            if self.refine:
                # GPTVQ-style codebook update: each centroid becomes the metric-weighted mean of the
                # (error-updated) vectors assigned to it; keep it only if the layer error drops.
                cb2 = _update_codebook(codes, xs, u, scale, cb, d)
                codes2, _ = _gptq_pass(w, u, scale, cb2, d)
                e1 = _layer_error(w, cb[codes].reshape(o, n) * scale[:, None], hd)
                e2 = _layer_error(w, cb2[codes2].reshape(o, n) * scale[:, None], hd)
                if e2 < e1:
                    codes, cb = codes2, cb2
        b = code_bits(k)
        tensors = {"codes": pack_codes(codes.cpu().numpy(), b), "codebook": f16(cb), "scale": f16(scale)}
        return PackedLinear(self.spec, "vq", (o, n), tensors, {"d": d, "k": k})


def _gptq_pass(
    w0: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, cb: torch.Tensor, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign vector columns left to right with GPTQ error feedback; returns (codes [o, nv],
    the normalised error-updated vectors that were matched [o, nv, d])."""
    w = w0.clone()
    o, n = w.shape
    codes = torch.zeros(o, n // d, dtype=torch.long, device=w.device)
    xs = torch.zeros(o, n // d, d, device=w.device)
    block = max(d, (128 // d) * d)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for a in range(0, i2 - i1, d):
            j = i1 + a
            t = torch.linalg.inv(u[j : j + d, j : j + d])  # metric of this block: ||(x - c) ub^-1||^2
            x = w1[:, a : a + d] / scale[:, None]
            c = _nearest(x @ t, cb @ t)
            codes[:, j // d] = c
            xs[:, j // d] = x
            e = (w1[:, a : a + d] - cb[c] * scale[:, None]) @ t
            w1[:, a:] -= e @ u[j : j + d, j:i2]
            err1[:, a : a + d] = e
        if i2 < n:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes, xs


def _update_codebook(
    codes: torch.Tensor, xs: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, cb: torch.Tensor, d: int
) -> torch.Tensor:
    o, nv = codes.shape
    k = cb.shape[0]
    ts = torch.stack([torch.linalg.inv(u[v * d : (v + 1) * d, v * d : (v + 1) * d]) for v in range(nv)])
    g = ts @ ts.transpose(1, 2)  # [nv, d, d] metric of each vector column
    m = (scale[:, None, None, None] ** 2) * g[None]  # [o, nv, d, d]
    flat = codes.reshape(-1)
    msum = torch.zeros(k, d, d, device=cb.device, dtype=torch.float64).index_add_(0, flat, m.reshape(-1, d, d).double())
    mx = (m @ xs[..., None]).reshape(-1, d).double()
    rhs = torch.zeros(k, d, device=cb.device, dtype=torch.float64).index_add_(0, flat, mx)
    used = torch.bincount(flat, minlength=k) > 0
    eye = torch.eye(d, dtype=torch.float64, device=cb.device)
    tr = msum.diagonal(dim1=1, dim2=2).sum(1).clamp(min=1e-30)
    sol = torch.linalg.solve(msum + (1e-9 * tr)[:, None, None] * eye, rhs[..., None])[..., 0]
    new = torch.where(used[:, None], sol.float(), cb)
    return new.to(torch.float16).float()


def _layer_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    dlt = (w - q).double()
    return float(((dlt @ h) * dlt).sum())


def parse_vq(spec: str, *args: str) -> VQQuantizer:
    from salomi.quantizers.spec import int_arg

    if len(args) not in (2, 3) or (len(args) == 3 and args[2] != "noft"):
        raise TypeError
    return VQQuantizer(
        int_arg(spec, args[0], "d", 2, 8), int_arg(spec, args[1], "k", 2, 65536), feedback=len(args) == 2
    )
