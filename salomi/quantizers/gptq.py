"""GPTQ: quantize one column at a time and push its error onto the columns not yet done.

The algorithm of Frantar et al. (2022): with U the upper Cholesky factor of H^-1
(H damped by `percdamp` x mean diag), column i is rounded, its error divided by U[i,i]
is spread over the later columns through row i of U, and the updates to columns beyond
the current block of 128 are applied lazily once per block. The rounding itself is a
pluggable "column quantizer", so the same loop writes
  * K-bit asymmetric groups ("grid", exactly like rtn, optional act-order `perm`),
  * binary ("sign", scale per group fixed up front from the group's weights),
  * ternary ("ternary", TWN threshold and scale per group fixed up front).

The Hessian helpers here (`prepare_hessian`, `gptq_sweep`, `weighted_error`) are shared
by the BiLLM, PB-LLM and VQ quantizers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from salomi.errors import SalomiError
from salomi.packing.bits import pack_rows, pack_trits
from salomi.quantizers.base import PackedLinear, Quantizer, f16, group_count
from salomi.quantizers.simple import grid_codes, grid_params, pack_grid

BLOCK = 128

# ---------------------------------------------------------------- Hessian helpers


def weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor | None) -> float:
    """tr((W-Q) H (W-Q)^T): the layer's summed output error on the calibration inputs."""
    d = (w.float() - q.float().to(w.device)).double()
    if h is None:
        return float((d * d).sum())
    return float(((d @ h.to(w.device).double()) * d).sum())


def check_hessian(hessian: torch.Tensor | None, n_in: int, spec: str) -> None:
    if hessian is not None and tuple(hessian.shape) != (n_in, n_in):
        raise SalomiError(f"{spec}: Hessian is {list(hessian.shape)}, expected [{n_in}, {n_in}] for this layer")


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """LAPACK's blocked Cholesky rounds differently on 1 and 2 threads (seen as ~1e-13 in U), and a
    quantizer's later choices can amplify that into other codes: the factorisations run on one
    thread so a file does not depend on torch's thread count (at <= 1536 columns it costs ~0.1 s).
    With torch's OpenMP backend the count is per thread (a thread started meanwhile inherits it),
    so saving and restoring it here is right even when quantizations overlap on several Python
    threads; a shared save restored by the last one out would leave the others on one thread
    (pinned by a test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor | None, percdamp: float = 0.01, act_order: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Return (W, U, perm, H): W float32 copy with dead columns zeroed (permuted if act_order),
    U the upper Cholesky factor of the damped H^-1 (float32, permuted order), perm or None,
    and the damped H (float64, permuted order)."""
    w = weight.detach().float().clone()
    n = w.shape[1]
    dev = w.device
    h = (
        torch.eye(n, dtype=torch.float64, device=dev)
        if hessian is None
        else hessian.detach().to(dev, torch.float64).clone()
    )
    dead = torch.diag(h) <= 0
    if bool(dead.any()):
        idx = torch.nonzero(dead).flatten()
        h[idx, idx] = 1.0
        w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    damp = percdamp * float(torch.diag(h).mean())
    eye = torch.eye(n, dtype=torch.float64, device=dev)
    with _one_cpu_thread():
        for attempt in range(8):
            hd = h + (damp * (10**attempt) if attempt else damp) * eye
            chol, info = torch.linalg.cholesky_ex(hd)
            if int(info) == 0:
                hinv = torch.cholesky_inverse(chol)
                u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
                if int(info2) == 0:
                    return w, u.float(), perm, hd
    raise SalomiError("Hessian is not positive definite even after heavy damping; recompute the calibration statistics")


class ColumnQuantizer:
    """Rounds one (error-updated) column at a time; `group` > 0 makes the sweep call
    enter_group with the current values of each group of columns when it starts."""

    group: int = 0

    def enter_group(self, start: int, wg: torch.Tensor) -> None:
        pass

    def quant(self, j: int, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def gptq_sweep(w: torch.Tensor, u: torch.Tensor, cq: ColumnQuantizer, block: int = BLOCK) -> torch.Tensor:
    """Run the GPTQ loop over w (in place); return the quantized weight (same column order)."""
    o, n = w.shape
    g = cq.group
    if g:
        block = (block // g) * g if g <= block else g  # a group never straddles a block
    q = torch.zeros_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if g and j % g == 0:
                cq.enter_group(j, w1[:, i : i + g])
            col = w1[:, i]
            qc = cq.quant(j, col)
            q[:, j] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        if i2 < n:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q


def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


# ---------------------------------------------------------------- column quantizers


class GridColumns(ColumnQuantizer):
    """Asymmetric K-bit grid; scale/zero from grid_params of each group when it starts."""

    def __init__(self, bits: int, group: int, o: int, n: int, device: torch.device) -> None:
        self.bits, self.group = bits, group
        ng = n // group
        self.scale = torch.zeros(o, ng, device=device)
        self.zero = torch.zeros(o, ng, device=device)
        self.codes = torch.zeros(o, n, device=device)

    def enter_group(self, start: int, wg: torch.Tensor) -> None:
        s, z = grid_params(wg, self.bits)
        self.scale[:, start // self.group] = s
        self.zero[:, start // self.group] = z

    def quant(self, j: int, w: torch.Tensor) -> torch.Tensor:
        s, z = self.scale[:, j // self.group], self.zero[:, j // self.group]
        c = grid_codes(w, s, z, self.bits)
        self.codes[:, j] = c
        return s * (c - z)


class StaticColumns(ColumnQuantizer):
    """Binary or ternary with per-group scales fixed up front (original column order),
    so act order needs no stored permutation: column j of the sweep is weight column col[j]."""

    def __init__(self, weight: torch.Tensor, group: int, kind: str, col: torch.Tensor | None, threshold: float = 0.7):
        o, n = weight.shape
        wg = weight.float().reshape(o, n // group, group)
        self.kind, self.g = kind, group
        if kind == "binary":
            self.scale = f32_16(wg.abs().mean(dim=2))
            self.delta = None
        else:
            delta = threshold * wg.abs().mean(dim=2)
            keep = wg.abs() > delta[:, :, None]
            self.scale = f32_16((wg.abs() * keep).sum(dim=2) / keep.sum(dim=2).clamp(min=1))
            self.delta = delta
        self.col = col.tolist() if col is not None else list(range(n))
        self.codes = torch.zeros(o, n, device=weight.device)

    def quant(self, j: int, w: torch.Tensor) -> torch.Tensor:
        c = self.col[j]
        s = self.scale[:, c // self.g]
        if self.kind == "binary":
            t = (w >= 0).float() * 2 - 1
        else:
            t = torch.sign(w) * (w.abs() > self.delta[:, c // self.g])
        self.codes[:, j] = t
        return s * t


def f32_16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


# ---------------------------------------------------------------- quantizer


class GPTQQuantizer(Quantizer):
    needs_hessian = True

    def __init__(
        self, kind: str, bits: int = 0, group: int | None = None, act_order: bool = False, percdamp: float = 0.01
    ) -> None:
        if kind not in ("grid", "binary", "ternary"):
            raise SalomiError(f"gptq: unknown grid {kind!r}")
        if kind == "grid" and group is None:
            raise SalomiError("gptq:K needs a group size: gptq:K:gG")
        self.kind, self.bits, self.group, self.act_order, self.percdamp = kind, bits, group, act_order, percdamp
        head = f"gptq:{bits}" if kind == "grid" else f"gptq:{kind}"
        self.spec = head + (f":g{group}" if group else "") + (":act" if act_order else "")

    def check_shape(self, shape: tuple[int, int]) -> None:
        group_count(shape[1], self.group or shape[1], self.spec)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        o, n = weight.shape
        g = self.group or n
        group_count(n, g, self.spec)
        check_hessian(hessian, n, self.spec)
        w, u, perm, _ = prepare_hessian(weight, hessian, self.percdamp, self.act_order)
        if self.kind == "grid":
            cq = GridColumns(self.bits, g, o, n, w.device)
            gptq_sweep(w, u, cq)
            return pack_grid(self.spec, cq.codes, cq.scale, cq.zero, self.bits, g, perm)
        # binary / ternary: scales from the (dead-zeroed) weight in original column order
        w_orig = w if perm is None else w[:, inverse_perm(perm)]
        cq = StaticColumns(w_orig, g, self.kind, perm)
        gptq_sweep(w, u, cq)
        codes = cq.codes if perm is None else cq.codes[:, inverse_perm(perm)]
        if self.kind == "binary":
            bits = (codes > 0).to(torch.uint8).cpu().numpy()
            tensors = {"bits": pack_rows(bits, 1), "scale": f16(cq.scale)}
            return PackedLinear(self.spec, "sign", (o, n), tensors, {"group": g})
        trits = (codes + 1).to(torch.uint8).cpu().numpy()
        tensors = {"trits": pack_trits(trits), "scale": f16(cq.scale)}
        return PackedLinear(self.spec, "ternary", (o, n), tensors, {"group": g})


def parse_gptq(spec: str, *args: str) -> GPTQQuantizer:
    """gptq:K:gG[:act] | gptq:binary[:gG][:act] | gptq:ternary[:gG][:act]"""
    from salomi.quantizers.spec import int_arg

    if not args:
        raise TypeError
    rest = list(args[1:])
    act = False
    if rest and rest[-1] == "act":
        act = True
        rest.pop()
    if len(rest) > 1:
        raise TypeError
    group = int_arg(spec, rest[0], "g") if rest else None
    if args[0] in ("binary", "ternary"):
        return GPTQQuantizer(args[0], 0, group, act)
    bits = int_arg(spec, args[0], "", 1, 8)
    if group is None:
        raise SalomiError(f"bad method spec {spec!r}: K-bit GPTQ needs a group size, e.g. gptq:{bits}:g64")
    return GPTQQuantizer("grid", bits, group, act)


__all__ = [
    "GPTQQuantizer",
    "ColumnQuantizer",
    "gptq_sweep",
    "prepare_hessian",
    "weighted_error",
    "parse_gptq",
]
