"""Baseline quantizers: binary, ternary and round-to-nearest K-bit groups.

Their storage formats ("sign", "ternary", "grid") are the shared ones that the
second-order methods (GPTQ, ...) also write, so they are defined here too.
"""

from __future__ import annotations

import numpy as np
import torch

from salomi.packing.bits import pack_rows, pack_trits, row_bytes, unpack_rows, unpack_trits
from salomi.quantizers.base import (
    PackedLinear,
    Quantizer,
    StorageFormat,
    expect,
    f16,
    group_count,
    register_format,
)

# ---------------------------------------------------------------- storage formats


def _expand(scales: torch.Tensor, group: int) -> torch.Tensor:
    return scales.repeat_interleave(group, dim=1)


@register_format
class SignFormat(StorageFormat):
    """w = scale[g] * (+1 if bit else -1). bits: uint8 [out, ceil(in/8)]; scale: fp16 [out, in/G]."""

    name = "sign"

    def validate(self, p: PackedLinear) -> None:
        o, i = p.shape
        g = int(p.params["group"])
        expect(p, "bits", "uint8", (o, row_bytes(i, 1)))
        expect(p, "scale", "float16", (o, i // g))

    def dequantize(self, p: PackedLinear) -> torch.Tensor:
        o, i = p.shape
        bits = torch.from_numpy(unpack_rows(p.tensors["bits"], i, 1).astype(np.float32))
        scale = torch.from_numpy(np.asarray(p.tensors["scale"], dtype=np.float32))
        return _expand(scale, int(p.params["group"])) * (2 * bits - 1)


@register_format
class TernaryFormat(StorageFormat):
    """w = scale[g] * (t - 1), t in {0,1,2} packed five per byte (base 3, 1.6 bits)."""

    name = "ternary"

    def validate(self, p: PackedLinear) -> None:
        o, i = p.shape
        g = int(p.params["group"])
        t = expect(p, "trits", "uint8", (o, (i + 4) // 5))
        expect(p, "scale", "float16", (o, i // g))
        if t.size and int(t.max()) > 242:
            from salomi.errors import SalomiError

            raise SalomiError("packed ternary layer has a byte above 242 (corrupt)")

    def dequantize(self, p: PackedLinear) -> torch.Tensor:
        o, i = p.shape
        t = torch.from_numpy(unpack_trits(p.tensors["trits"], i).astype(np.float32))
        scale = torch.from_numpy(np.asarray(p.tensors["scale"], dtype=np.float32))
        return _expand(scale, int(p.params["group"])) * (t - 1)


@register_format
class GridFormat(StorageFormat):
    """Asymmetric K-bit groups: w = scale[g] * (q - zero[g]), q in [0, 2**K).

    codes: uint8 [out, ceil(in*K/8)] (bit stream, see packing.bits); scale, zero: fp16
    [out, in/G]. Optional perm: int16/int32 [in] -- codes are stored in the column order
    perm (GPTQ activation order) and column perm[j] of the weight is stored column j.
    """

    name = "grid"

    def validate(self, p: PackedLinear) -> None:
        o, i = p.shape
        k, g = int(p.params["bits"]), int(p.params["group"])
        expect(p, "codes", "uint8", (o, row_bytes(i, k)))
        expect(p, "scale", "float16", (o, i // g))
        expect(p, "zero", "float16", (o, i // g))
        if "perm" in p.tensors:
            perm = np.asarray(p.tensors["perm"])
            if perm.shape != (i,) or not np.array_equal(np.sort(perm), np.arange(i)):
                from salomi.errors import SalomiError

                raise SalomiError("packed grid layer has an invalid column permutation (corrupt)")

    def dequantize(self, p: PackedLinear) -> torch.Tensor:
        o, i = p.shape
        k, g = int(p.params["bits"]), int(p.params["group"])
        q = torch.from_numpy(unpack_rows(p.tensors["codes"], i, k).astype(np.float32))
        scale = torch.from_numpy(np.asarray(p.tensors["scale"], dtype=np.float32))
        zero = torch.from_numpy(np.asarray(p.tensors["zero"], dtype=np.float32))
        w = _expand(scale, g) * (q - _expand(zero, g))
        if "perm" in p.tensors:
            out = torch.empty_like(w)
            out[:, torch.from_numpy(np.asarray(p.tensors["perm"]).astype(np.int64))] = w
            w = out
        return w


# ---------------------------------------------------------------- grid helpers (shared with GPTQ)


def grid_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max asymmetric scale and zero for each row of w [rows, group], rounded to fp16."""
    lo = w.min(dim=1).values.clamp(max=0) if bits > 1 else w.min(dim=1).values
    hi = w.max(dim=1).values.clamp(min=0) if bits > 1 else w.max(dim=1).values
    levels = (1 << bits) - 1
    # The floor keeps |zero| = |lo|/scale below 2**14, inside fp16's range, even for a
    # constant or same-sign group; for ordinary groups (lo <= 0 <= hi) it never binds.
    scale = torch.maximum((hi - lo) / levels, torch.maximum(lo.abs(), hi.abs()) / 2**14).clamp(min=6.1e-5)
    zero = -lo / scale
    # The file stores fp16: quantize against exactly the values the reader will see.
    scale = scale.to(torch.float16).to(torch.float32).clamp(min=6.1e-5)
    zero = zero.to(torch.float16).to(torch.float32)
    return scale, zero


def grid_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code for each weight (scale/zero broadcast along the last dim)."""
    return torch.clamp(torch.round(w / scale + zero), 0, (1 << bits) - 1)


def pack_grid(
    method: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
    perm: torch.Tensor | None = None,
) -> PackedLinear:
    o, i = codes.shape
    tensors = {
        "codes": pack_rows(codes.to(torch.uint8).cpu().numpy(), bits),
        "scale": f16(scale),
        "zero": f16(zero),
    }
    if perm is not None:
        tensors["perm"] = perm.cpu().numpy().astype(np.int16 if i <= 32767 else np.int32)
    return PackedLinear(method, "grid", (o, i), tensors, {"bits": bits, "group": group})


# ---------------------------------------------------------------- quantizers


class BinaryQuantizer(Quantizer):
    """Sign times the L2-optimal scale (mean |w|) per row or per group."""

    def __init__(self, group: int | None = None) -> None:
        self.group = group
        self.spec = "binary" if group is None else f"binary:g{group}"

    def check_shape(self, shape: tuple[int, int]) -> None:
        group_count(shape[1], self.group or shape[1], self.spec)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        o, i = weight.shape
        g = self.group or i
        w = weight.float().reshape(o, group_count(i, g, self.spec), g)
        scale = w.abs().mean(dim=2)
        bits = (weight >= 0).to(torch.uint8).cpu().numpy()
        return PackedLinear(self.spec, "sign", (o, i), {"bits": pack_rows(bits, 1), "scale": f16(scale)}, {"group": g})


class TernaryQuantizer(Quantizer):
    """{-a, 0, +a}: threshold 0.7 * mean|w| (TWN), a = mean |w| above it, per row or group."""

    def __init__(self, group: int | None = None, threshold: float = 0.7) -> None:
        self.group = group
        self.threshold = threshold
        self.spec = "ternary" if group is None else f"ternary:g{group}"

    def check_shape(self, shape: tuple[int, int]) -> None:
        group_count(shape[1], self.group or shape[1], self.spec)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        o, i = weight.shape
        g = self.group or i
        w = weight.float().reshape(o, group_count(i, g, self.spec), g)
        delta = self.threshold * w.abs().mean(dim=2, keepdim=True)
        keep = w.abs() > delta
        scale = (w.abs() * keep).sum(dim=2) / keep.sum(dim=2).clamp(min=1)
        t = (torch.sign(w) * keep + 1).reshape(o, i).to(torch.uint8).cpu().numpy()
        return PackedLinear(self.spec, "ternary", (o, i), {"trits": pack_trits(t), "scale": f16(scale)}, {"group": g})


class RTNQuantizer(Quantizer):
    """Round-to-nearest on an asymmetric K-bit grid per group of G weights."""

    def __init__(self, bits: int, group: int) -> None:
        self.bits, self.group = bits, group
        self.spec = f"rtn:{bits}:g{group}"

    def check_shape(self, shape: tuple[int, int]) -> None:
        group_count(shape[1], self.group, self.spec)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        o, i = weight.shape
        ng = group_count(i, self.group, self.spec)
        w = weight.float().reshape(o * ng, self.group)
        scale, zero = grid_params(w, self.bits)
        q = grid_codes(w, scale[:, None], zero[:, None], self.bits)
        return pack_grid(self.spec, q.reshape(o, i), scale.reshape(o, ng), zero.reshape(o, ng), self.bits, self.group)
