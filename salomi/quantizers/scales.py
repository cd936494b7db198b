"""`+ls` (learned scales): refit the fp16 scales (and zero points) of a packed layer, codes fixed.

Given the codes, every supported format's weight is linear in its per-row / per-group
scale parameters: W[r] = fixed[r] + sum_t theta[r, t, g] * V_t[r] restricted to group g.
So the layer's output error tr((W - What) H (W - What)^T) is a quadratic in each row's
parameters, minimised exactly by a small weighted least-squares solve per row. The
result is rounded to fp16 again and a row keeps its old parameters unless the rounded
new ones are better, so +ls never increases the error and never changes the bpw.

Supported: grid (scale and zero per group, perm respected), sign, ternary, vq (row
scale), billm (the four row scales), pbllm (binary row scale; the sparse salient part is
fixed) and any of these + lowrank (the U.V part is held fixed).
"""

from __future__ import annotations

import numpy as np
import torch

from salomi.errors import SalomiError
from salomi.packing.bits import unpack_rows, unpack_trits
from salomi.quantizers.base import PackedLinear, Quantizer, storage_format

SUPPORTED = ("grid", "sign", "ternary", "vq", "billm", "pbllm")


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _bases(p: PackedLinear) -> tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(bases V_t [o, n], group size, current theta [o, T, ng], fixed part [o, n], perm or None)."""
    o, n = p.shape
    t = p.tensors
    fixed = torch.zeros(o, n)
    if p.format == "grid":
        k, g = int(p.params["bits"]), int(p.params["group"])
        q = _t(unpack_rows(t["codes"], n, k))
        s, z = _t(t["scale"]), _t(t["zero"])
        perm = torch.from_numpy(np.asarray(t["perm"]).astype(np.int64)) if "perm" in t else None
        return [q, -torch.ones(o, n)], g, torch.stack([s, s * z], 1), fixed, perm
    if p.format == "sign":
        g = int(p.params["group"])
        return [_t(unpack_rows(t["bits"], n, 1)) * 2 - 1], g, _t(t["scale"])[:, None], fixed, None
    if p.format == "ternary":
        g = int(p.params["group"])
        return [_t(unpack_trits(t["trits"], n)) - 1], g, _t(t["scale"])[:, None], fixed, None
    if p.format == "vq":
        p1 = PackedLinear(p.method, "vq", p.shape, dict(t, scale=np.ones(o, np.float16)), p.params)
        return [p1.dequantize()], n, _t(t["scale"])[:, None, None], fixed, None
    if p.format == "billm":
        col = _t(unpack_rows(np.asarray(t["colmask"])[None, :], n, 1))[0] > 0
        s1 = _t(unpack_rows(t["bits"], n, 1)) * 2 - 1
        b2 = _t(unpack_rows(t["bits2"], n, 1))
        c = col[None, :].float()
        v = [c * s1, c * (2 * b2 - 1), (1 - c) * s1 * (1 - b2), (1 - c) * s1 * b2]
        return v, n, _t(t["scale"])[:, :, None], fixed, None
    if p.format == "pbllm":
        fmt = storage_format("pbllm")
        rows, cols = fmt.positions(p)
        mask = torch.zeros(o, n)
        mask[rows, cols] = 1
        fixed[rows, cols] = torch.from_numpy(fmt.values(p, rows))
        v = (1 - mask) * (_t(unpack_rows(t["bits"], n, 1)) * 2 - 1)
        return [v], n, _t(t["scale"])[:, None, None], fixed, None
    raise SalomiError(f"+ls cannot refit scales of format {p.format!r} (supported: {', '.join(SUPPORTED)})")


def _write(p: PackedLinear, theta: torch.Tensor) -> dict[str, np.ndarray]:
    t = dict(p.tensors)
    th = theta.numpy()
    if p.format == "grid":
        t["scale"] = th[:, 0].astype(np.float16)
        t["zero"] = (th[:, 1] / t["scale"].astype(np.float32)).astype(np.float16)
    elif p.format in ("sign", "ternary"):
        t["scale"] = th[:, 0].astype(np.float16)
    elif p.format == "billm":
        t["scale"] = th[:, :, 0].astype(np.float16)
    else:  # vq, pbllm
        t["scale"] = th[:, 0, 0].astype(np.float16)
    return t


def _rounded(p: PackedLinear, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """theta after the fp16 round trip the file imposes."""
    if p.format == "grid":
        s = theta[:, 0].to(torch.float16).float()
        ok = s.abs() > 0
        z = torch.where(ok, theta[:, 1] / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(s))
        z = z.to(torch.float16).float()
        bad = ~torch.isfinite(z) | ~torch.isfinite(s)
        return torch.stack([s, torch.where(bad, 0.0, s * z)], 1), bad.any(1)
    r = theta.to(torch.float16).float()
    return r, ~torch.isfinite(r).all(dim=2).all(dim=1)


def _quad(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    """Per-row error t^T H t - 2 x^T b + x^T A x of parameters x."""
    x = x.double().reshape(a.shape[0], a.shape[1], 1)
    return const - 2 * (b[:, :, None] * x).sum((1, 2)) + (x.transpose(1, 2) @ a @ x)[:, 0, 0]


def refit_scales(
    p: PackedLinear, weight: torch.Tensor, hessian: torch.Tensor | None, rows_per_chunk: int = 32
) -> PackedLinear:
    """The same packed layer with output-error-optimal fp16 scales (codes untouched)."""
    if p.format.endswith("+lowrank"):
        from salomi.quantizers.lowrank import PREFIX, lowrank_product, split_lowrank

        base, lr = split_lowrank(p)
        fixed = lowrank_product(lr)
        nb = refit_scales(base, weight.detach().cpu().float() - fixed, hessian, rows_per_chunk)
        tensors = dict(nb.tensors)
        tensors.update({PREFIX + k: v for k, v in lr.items()})
        return PackedLinear(p.method, p.format, p.shape, tensors, p.params)
    o, n = p.shape
    bases, g, theta0, fixed, perm = _bases(p)
    w = weight.detach().cpu().float()
    h = torch.eye(n) if hessian is None else hessian.detach().cpu().float()
    if perm is not None:
        w, fixed, h = w[:, perm], fixed[:, perm], h[perm][:, perm]
    ng, T = n // g, len(bases)
    h = h.double()
    h4 = h.reshape(ng, g, ng, g)
    target = (w - fixed).double()
    th = theta0.clone()
    for r0 in range(0, o, rows_per_chunk):
        r1 = min(o, r0 + rows_per_chunk)
        c = r1 - r0
        v = torch.stack([b[r0:r1].double() for b in bases], 1).reshape(c, T, ng, g)
        hv = torch.einsum("gahb,ruhb->ruhga", h4, v)  # [c, T(u), ng(h), ng(g), g(a)] = sum_b H[g a, h b] V_u[h b]
        a = torch.einsum("rtga,ruhga->rtguh", v, hv).reshape(c, T * ng, T * ng)
        th_ = target[r0:r1]
        b = torch.einsum("rtga,rga->rtg", v, (th_ @ h).reshape(c, ng, g)).reshape(c, T * ng)
        const = ((th_ @ h) * th_).sum(1)
        ridge = 1e-9 * a.diagonal(dim1=1, dim2=2).abs().mean(1).clamp(min=1e-30)
        a_r = a + ridge[:, None, None] * torch.eye(T * ng, dtype=a.dtype)
        new = torch.linalg.solve(a_r, b[:, :, None])[:, :, 0]
        new_r, bad = _rounded(p, new.float().reshape(c, T, ng))
        old = theta0[r0:r1].double().reshape(c, T * ng)

        better = (_quad(new_r, a, b, const) < _quad(old, a, b, const)) & ~bad
        th[r0:r1] = torch.where(better[:, None, None], new_r.reshape(th[r0:r1].shape), th[r0:r1])
    return PackedLinear(p.method, p.format, p.shape, _write(p, th), p.params)


class LearnedScales(Quantizer):
    needs_hessian = True

    def __init__(self, base: Quantizer) -> None:
        self.base = base
        self.spec = f"{base.spec}+ls"

    def check_shape(self, shape: tuple[int, int]) -> None:
        self.base.check_shape(shape)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        p = self.base.quantize(weight, hessian if self.base.needs_hessian else None)
        q = refit_scales(p, weight, hessian)
        return PackedLinear(self.spec, q.format, q.shape, q.tensors, q.params)


def wrap_ls(spec: str, base: Quantizer, *args: str) -> LearnedScales:
    if args:
        raise TypeError
    return LearnedScales(base)
