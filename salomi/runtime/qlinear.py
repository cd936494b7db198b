"""QuantLinear: a Linear whose weight lives only in packed form.

Two ways to run it: "kernels" multiplies straight from the packed bytes with the C
kernels (the point of the format: no float copy of the weight), and "dequant"
expands the weight to float once and uses torch's matmul (the reference path the
kernels are checked against; also what runs on CUDA).
"""

from __future__ import annotations

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

        ok = kernels.available() and kernels.supports(self._kernel_packed)
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
            y = kernels.packed_matmul(x.contiguous(), self._kernel_packed)
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
    from salomi.quantizers.lowrank import split_lowrank

    base, lr = split_lowrank(p)
    f = {k: torch.from_numpy(lr[k].astype("float32")) for k in ("u", "u_scale", "v", "v_scale")}
    return base, (f["u"] * f["u_scale"][:, None], f["v"] * f["v_scale"][:, None])
