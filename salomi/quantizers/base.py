"""What every quantizer produces, and the one table of storage formats.

A quantizer turns a float weight [out, in] (plus, for the second-order methods, the
layer's input Hessian [in, in]) into a PackedLinear: named integer/fp16 arrays and a
few JSON parameters. The storage format named in `PackedLinear.format` alone decides
how those arrays are read back; many methods share a format (GPTQ writes the same
"grid" as round-to-nearest), so the file reader and the kernels know only formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from salomi.errors import SalomiError


@dataclass
class PackedLinear:
    method: str
    format: str
    shape: tuple[int, int]
    tensors: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.tensors.values()))

    @property
    def n_weights(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bpw(self) -> float:
        return self.nbytes * 8 / self.n_weights

    def dequantize(self) -> torch.Tensor:
        return storage_format(self.format).dequantize(self)

    def validate(self) -> None:
        storage_format(self.format).validate(self)


class StorageFormat:
    """One entry of the format table: exact layout, validation and the reference dequantizer."""

    name: ClassVar[str]

    def validate(self, p: PackedLinear) -> None:  # raise SalomiError on any inconsistency
        raise NotImplementedError

    def dequantize(self, p: PackedLinear) -> torch.Tensor:
        raise NotImplementedError


FORMATS: dict[str, StorageFormat] = {}


def register_format(cls: type[StorageFormat]) -> type[StorageFormat]:
    FORMATS[cls.name] = cls()
    return cls


# Composite formats "BASE+SUFFIX" (e.g. "grid+lowrank"): SUFFIX -> factory(base format name).
COMPOSITES: dict[str, Any] = {}


def storage_format(name: str) -> StorageFormat:
    if name not in FORMATS or "+" in name:
        import salomi.quantizers.methods  # noqa: F401  (registers every format and composite)
    fmt = FORMATS.get(name)
    if fmt is None and "+" in name:
        base, _, suffix = name.rpartition("+")
        if suffix in COMPOSITES:
            return COMPOSITES[suffix](base)
    if fmt is None:
        raise SalomiError(f"unknown storage format {name!r} (known: {', '.join(sorted(FORMATS))})") from None
    return fmt


def expect(p: PackedLinear, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Fetch a tensor of a packed layer, checking dtype and shape (used by validate)."""
    a = p.tensors.get(name)
    if a is None:
        raise SalomiError(f"packed layer ({p.method}) is missing tensor {name!r}")
    if a.dtype != np.dtype(dtype) or tuple(a.shape) != tuple(shape):
        raise SalomiError(
            f"packed layer ({p.method}) tensor {name!r} is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}"
        )
    return a


class Quantizer:
    """A quantizer with its settings: one job, weight (+ Hessian) in, PackedLinear out."""

    spec: str
    needs_hessian: ClassVar[bool] = False

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        raise NotImplementedError

    def check_shape(self, shape: tuple[int, int]) -> None:
        """Raise SalomiError if this quantizer cannot take a weight of this shape."""


def f16(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float16).cpu().numpy()


def group_count(in_features: int, group: int, spec: str) -> int:
    if in_features % group:
        raise SalomiError(
            f"{spec}: group size {group} does not divide a row of {in_features} weights; "
            f"pick a group size that divides every row (e.g. 32, 64 or 192 for 576/1536-wide models)"
        )
    return in_features // group
