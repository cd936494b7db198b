"""QuantLinear: a Linear whose weight lives only in packed form.

Two ways to run it: "kernels" multiplies straight from the packed bytes with the C
kernels (the point of the format: no float copy of the weight), and "dequant"
expands the weight to float once and uses torch's matmul (the reference path the
kernels are checked against; also what runs on CUDA).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from salomi.quantizers.base import PackedLinear

RUNTIMES = ("auto", "kernels", "dequant")


class QuantLinear(nn.Module):
    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None = None, runtime: str = "dequant") -> None:
        super().__init__()
        self.packed = packed
        self.out_features, self.in_features = packed.shape
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None
        self.runtime = runtime
        self._weight: torch.Tensor | None = None
        # A "+rot" layer runs its base format's kernel between the two Hadamard rotations:
        # y = U^T (Q' (V x)), O(n log n) extra per token instead of a float copy of W.
        # "+lowrank" adds its int8 factors' product as two thin matmuls, outside the rotation
        # (BASE+rot+lowrank) or inside it (BASE+lowrank+rot); R (in + out) floats, not a copy of W.
        self._rot_seed: int | None = None
        self._lr_outer = self._lr_inner = None
        kp = packed
        if kp.format.endswith("+lowrank"):
            kp, self._lr_outer = _lowrank_factors(kp)
        if kp.format.endswith("+rot"):
            from salomi.quantizers.rotation import split_rot

            self._rot_seed = int(kp.params["rot_seed"])
            kp = split_rot(kp)
            if kp.format.endswith("+lowrank"):
                kp, self._lr_inner = _lowrank_factors(kp)
        self._kernel_packed = kp
        self._composite: _BiLLMKernels | _PBLLMKernels | None = None

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.packed.method}, {self.packed.bpw:.3f} bpw, {self.runtime}"

    def dequantized_weight(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if self._weight is None or self._weight.device != torch.device(device):
            self._weight = self.packed.dequantize().to(device)
        return self._weight

    def uses_kernels(self, x: torch.Tensor) -> bool:
        if self.runtime == "dequant" or x.device.type != "cpu":
            return False
        from salomi.runtime import kernels

        fmt = self._kernel_packed.format
        ok = kernels.available() and (kernels.supports(self._kernel_packed) or fmt in COMPOSITE_KERNELS)
        if ok and fmt in COMPOSITE_KERNELS and self._composite is None:
            self._composite = COMPOSITE_KERNELS[fmt](self._kernel_packed)
        if self.runtime == "kernels" and not ok:
            raise RuntimeError(f"no CPU kernel for format {self.packed.format!r}; use --runtime dequant")
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernels(x):
            from salomi.runtime import kernels

            x = x.float()
            x0 = x
            if self._rot_seed is not None:
                from salomi.quantizers.rotation import transform

                x = transform(x, self._rot_seed)
            x = x.contiguous()
            if self._composite is not None:
                y = self._composite(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
            else:
                y = kernels.packed_matmul(x, self._kernel_packed)
            if self._lr_inner is not None:
                y = y + (x @ self._lr_inner[1].T) @ self._lr_inner[0].T
            if self._rot_seed is not None:
                y = transform(y, self._rot_seed + 1, inverse=True)
            if self._lr_outer is not None:
                y = y + (x0 @ self._lr_outer[1].T) @ self._lr_outer[0].T
            return y + self.bias if self.bias is not None else y
        w = self.dequantized_weight(x.device)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _lowrank_factors(p: PackedLinear) -> tuple[PackedLinear, tuple[torch.Tensor, torch.Tensor]]:
    """The base part of a "+lowrank" layer and its factors (u * u_scale [out, R], v * v_scale [R, in])."""
    from salomi.quantizers.lowrank import lowrank_factors, split_lowrank

    base, lr = split_lowrank(p)
    return base, lowrank_factors(lr)


def _unit_sign(p: PackedLinear, bits: np.ndarray) -> PackedLinear:
    """A sign layer over `bits` with scale 1 per row (its GEMV is the plain +-1 sum)."""
    o, i = (int(v) for v in p.shape)
    return PackedLinear(p.method, "sign", (o, i), {"bits": bits, "scale": np.ones((o, 1), np.float16)}, {"group": i})


class _BiLLMKernels:
    """billm from its bits. With S the salient columns and s = 2 bit - 1:
    y = a1 (s1 . x_S) + a2 (s2 . x_S) + a_lo (s1 . x_N) + (a_hi - a_lo) (s1 b2 . x_N), and
    s1 b2 = (s1 + s1 s2) / 2 where s1 s2 is the sign of XNOR(bits, bits2): three unit-scale
    sign GEMVs (bits on [x_S; x_N], bits2 on x_S, the XNOR plane on x_N) and one derived bit
    per weight in memory."""

    def __init__(self, p: PackedLinear) -> None:
        from salomi.packing.bits import unpack_rows

        i = int(p.shape[1])
        bits, bits2 = np.asarray(p.tensors["bits"]), np.asarray(p.tensors["bits2"])
        self.salient = torch.from_numpy(unpack_rows(np.asarray(p.tensors["colmask"])[None, :], i, 1)[0].astype(bool))
        self.s1, self.s2 = _unit_sign(p, bits), _unit_sign(p, bits2)
        self.s12 = _unit_sign(p, np.bitwise_not(np.bitwise_xor(bits, bits2)))
        sc = torch.from_numpy(np.asarray(p.tensors["scale"], dtype=np.float32))
        self.a1, self.a2, self.lo, self.step = sc[:, 0], sc[:, 1], sc[:, 2], sc[:, 3] - sc[:, 2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from salomi.runtime import kernels

        xs = x * self.salient
        xn = x - xs
        ac = kernels.packed_matmul(torch.cat([xs, xn]).contiguous(), self.s1)
        a, c = ac[: x.shape[0]], ac[x.shape[0] :]
        b = kernels.packed_matmul(xs.contiguous(), self.s2)
        d = kernels.packed_matmul(xn.contiguous(), self.s12)
        return self.a1 * a + self.a2 * b + self.lo * c + self.step * ((c + d) * 0.5)


class _PBLLMKernels:
    """pbllm: the sign kernel on its bits with the row scales, plus the salient weights as a
    sparse correction (value - scale * sign at each salient place), built at load as CSR with
    int32 columns and float32 deltas: 8 bytes per salient weight in memory, none per other."""

    def __init__(self, p: PackedLinear) -> None:
        from salomi.packing.bits import unpack_rows
        from salomi.quantizers.base import storage_format

        o, i = (int(v) for v in p.shape)
        fmt = storage_format("pbllm")
        rows, cols = fmt.positions(p)
        vals = fmt.values(p, rows)
        scale = np.asarray(p.tensors["scale"], dtype=np.float32)
        signs = unpack_rows(np.asarray(p.tensors["bits"]), i, 1)[rows, cols].astype(np.float32) * 2 - 1
        order = np.lexsort((cols, rows))
        rows, cols, delta = rows[order], cols[order], (vals - scale[rows] * signs)[order]
        crow = np.zeros(o + 1, dtype=np.int32)
        np.add.at(crow, rows + 1, 1)
        with warnings.catch_warnings():  # CSR is "beta" in torch; the invariants (indices from the file) are checked
            warnings.simplefilter("ignore", UserWarning)
            self.sparse = torch.sparse_csr_tensor(torch.from_numpy(np.cumsum(crow, dtype=np.int32)),
                                                  torch.from_numpy(cols.astype(np.int32)),
                                                  torch.from_numpy(delta.astype(np.float32)), size=(o, i),
                                                  check_invariants=True)
        self.sign = PackedLinear(p.method, "sign", (o, i), {"bits": p.tensors["bits"], "scale": scale.astype(np.float16)[:, None]},
                                 {"group": i})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from salomi.runtime import kernels

        return kernels.packed_matmul(x, self.sign) + (self.sparse @ x.T).T


COMPOSITE_KERNELS = {"billm": _BiLLMKernels, "pbllm": _PBLLMKernels}
