"""`+lowrank:rR`: add an int8 rank-R correction U.V to any base method's weight.

After the base quantizer, the residual E = W - What is approximated in the layer's own
metric tr((E - UV) H (E - UV)^T): with H + damp = L L^T, the best rank-R fit is the
truncated SVD of E L taken back through L^-1. V is rounded to int8 (fp16 scale per row
of V), then U is refitted by weighted least squares against the rounded V and rounded
to int8 (fp16 scale per row of U). Without a Hessian the plain SVD of E is used.

Storage: the base layer's tensors unchanged plus lowrank.u int8 [out, R],
lowrank.u_scale fp16 [out], lowrank.v int8 [R, in], lowrank.v_scale fp16 [R], under the
composite format "BASE+lowrank" (W = base dequantize + (u*u_scale) @ (v*v_scale)).
"""

from __future__ import annotations

import numpy as np
import torch

from salomi.errors import SalomiError
from salomi.quantizers.base import COMPOSITES, PackedLinear, Quantizer, StorageFormat, expect, f16, storage_format
from salomi.quantizers.gptq import check_hessian

PREFIX = "lowrank."
SUFFIX = "+lowrank"


def split_lowrank(p: PackedLinear) -> tuple[PackedLinear, dict[str, np.ndarray]]:
    """The base part of a "BASE+lowrank" layer, and its lowrank.* tensors (prefix removed)."""
    if not p.format.endswith(SUFFIX):
        raise SalomiError(f"packed layer format {p.format!r} has no low-rank part")
    base = {n: a for n, a in p.tensors.items() if not n.startswith(PREFIX)}
    lr = {n[len(PREFIX) :]: a for n, a in p.tensors.items() if n.startswith(PREFIX)}
    return PackedLinear(p.method, p.format[: -len(SUFFIX)], p.shape, base, p.params), lr


class LowRankFormat(StorageFormat):
    """BASE+lowrank: W = BASE.dequantize(tensors without "lowrank.", same params)
    + (u * u_scale[:, None]) @ (v * v_scale[:, None]), with lowrank.u int8 [out, R],
    lowrank.u_scale fp16 [out], lowrank.v int8 [R, in], lowrank.v_scale fp16 [R], 1 <= R <= min(out, in)."""

    def __init__(self, base: str) -> None:
        self.base = storage_format(base)
        self.name = base + SUFFIX

    def validate(self, p: PackedLinear) -> None:
        base, _ = split_lowrank(p)
        self.base.validate(base)
        o, i = p.shape
        u = p.tensors.get(PREFIX + "u")
        if u is None or u.ndim != 2:
            raise SalomiError(f"packed layer ({p.method}) is missing a 2-D tensor 'lowrank.u'")
        r = u.shape[1]
        if not 1 <= r <= min(o, i):
            raise SalomiError(f"packed layer ({p.method}) has low rank {r} outside 1..{min(o, i)} (corrupt)")
        expect(p, PREFIX + "u", "int8", (o, r))
        expect(p, PREFIX + "u_scale", "float16", (o,))
        expect(p, PREFIX + "v", "int8", (r, i))
        expect(p, PREFIX + "v_scale", "float16", (r,))

    def dequantize(self, p: PackedLinear) -> torch.Tensor:
        base, lr = split_lowrank(p)
        return self.base.dequantize(base) + lowrank_product(lr)


def lowrank_factors(lr: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored factors in float32: (u * u_scale [out, R], v * v_scale [R, in])."""
    f = {k: torch.from_numpy(np.asarray(lr[k], dtype=np.float32)) for k in ("u", "u_scale", "v", "v_scale")}
    return f["u"] * f["u_scale"][:, None], f["v"] * f["v_scale"][:, None]


def lowrank_product(lr: dict[str, np.ndarray]) -> torch.Tensor:
    """(u * u_scale) @ (v * v_scale), summed rank by rank with elementwise ops in a fixed order:
    bit-identical wherever it runs (a BLAS matmul may round differently with memory alignment)."""
    u, v = lowrank_factors(lr)
    out = torch.zeros(u.shape[0], v.shape[1])
    for r in range(u.shape[1]):
        out = out + u[:, r : r + 1] * v[r : r + 1, :]
    return out


COMPOSITES[SUFFIX[1:]] = LowRankFormat


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row with an fp16 scale; returns (int codes, fp16-exact scale)."""
    s = (x.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.float16).float().clamp(min=6.1e-8)
    q = torch.clamp(torch.round(x / s[:, None]), -127, 127)
    return q, s


def fit_lowrank(
    resid: torch.Tensor, hessian: torch.Tensor | None, rank: int, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u int codes [o,R], u_scale [o], v int codes [R,i], v_scale [R]) minimising the weighted error."""
    e = resid.double()
    n = e.shape[1]
    if hessian is None:
        h = torch.eye(n, dtype=torch.float64, device=e.device)
    else:
        h = hessian.to(e.device, torch.float64)
        dead = torch.diag(h) <= 0
        h = h + torch.diag(dead.double())
        h = h + percdamp * float(torch.diag(h).mean()) * torch.eye(n, dtype=torch.float64, device=e.device)
    chol = torch.linalg.cholesky(h)  # h = L L^T
    a, sv, bt = torch.linalg.svd(e @ chol, full_matrices=False)
    root = sv[:rank].sqrt()
    v = torch.linalg.solve_triangular(chol, (root[:, None] * bt[:rank]), upper=False, left=False)  # (.) L^-1
    vq, vs = int8_rows(v.float())
    vhat = (vq * vs[:, None]).double()
    gram = vhat @ h @ vhat.T
    gram = gram + 1e-10 * float(torch.diag(gram).mean().clamp(min=1e-30)) * torch.eye(
        rank, dtype=torch.float64, device=e.device
    )
    u = torch.linalg.solve(gram, (e @ h @ vhat.T).T).T  # least squares for U given the rounded V
    if not bool(torch.isfinite(u).all()):
        u = a[:, :rank] * root[None, :]
    uq, us = int8_rows(u.float())
    return uq, us, vq, vs


class LowRankQuantizer(Quantizer):
    needs_hessian = True

    def __init__(self, base: Quantizer, rank: int) -> None:
        self.base, self.rank = base, rank
        self.spec = f"{base.spec}+lowrank:r{rank}"

    def check_shape(self, shape: tuple[int, int]) -> None:
        self.base.check_shape(shape)
        if self.rank > min(shape):
            raise SalomiError(
                f"{self.spec}: rank {self.rank} exceeds min(out, in) = {min(shape)} of a {shape[0]}x{shape[1]} layer"
            )

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        self.check_shape(tuple(weight.shape))
        check_hessian(hessian, weight.shape[1], self.spec)
        p = self.base.quantize(weight, hessian if self.base.needs_hessian else None)
        if p.format.endswith(SUFFIX):
            raise SalomiError(f"{self.spec}: the base already has a low-rank part; use one +lowrank")
        resid = weight.float() - p.dequantize().to(weight.device)
        uq, us, vq, vs = fit_lowrank(resid, hessian, self.rank)
        tensors = dict(p.tensors)
        tensors[PREFIX + "u"] = uq.to(torch.int8).cpu().numpy()
        tensors[PREFIX + "u_scale"] = f16(us)
        tensors[PREFIX + "v"] = vq.to(torch.int8).cpu().numpy()
        tensors[PREFIX + "v_scale"] = f16(vs)
        return PackedLinear(self.spec, p.format + SUFFIX, p.shape, tensors, dict(p.params))


def wrap_lowrank(spec: str, base: Quantizer, *args: str) -> LowRankQuantizer:
    from salomi.quantizers.spec import int_arg

    if len(args) != 1:
        raise TypeError
    return LowRankQuantizer(base, int_arg(spec, args[0], "r", 1, 1 << 16))
