"""Shared by the quantizer tests: correlated calibration inputs and a file round trip."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from salomi.packing.container import load, save
from salomi.quantizers.base import PackedLinear, Quantizer


def correlated(o: int, n: int, seed: int = 0, ntok: int = 1024, salient: int = 0,
               low_rank: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and H = 2/n X^T X for strongly correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, n, generator=g) * 0.05
    if salient:
        w[:, :salient] *= 8  # a few salient columns
    if low_rank:
        w += 0.05 * torch.randn(o, 2, generator=g) @ torch.randn(2, n, generator=g)
    x = torch.randn(ntok, max(2, n // 8), generator=g) @ torch.randn(max(2, n // 8), n, generator=g)
    x = (x + 0.3 * torch.randn(ntok, n, generator=g)) * (torch.rand(n, generator=g) * 3 + 0.2)
    return w, 2 / ntok * x.T @ x


def roundtrip(p: PackedLinear) -> None:
    """pack -> container save -> load -> dequantize gives exactly the same weight."""
    before = p.dequantize()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "layer.salomi"
        save(path, p.tensors, {"method": p.method, "format": p.format, "shape": list(p.shape), "params": p.params})
        c = load(path)
        q = PackedLinear(c.metadata["method"], c.metadata["format"], tuple(c.metadata["shape"]), dict(c.tensors),
                         c.metadata["params"])
        q.validate()
        assert torch.equal(q.dequantize(), before)


def deterministic_roundtrip(q: Quantizer, w: torch.Tensor, h: torch.Tensor) -> PackedLinear:
    """Quantize twice: identical tensors; the file round trip is exact; bpw is the stored bytes."""
    p1, p2 = q.quantize(w, h), q.quantize(w, h)
    roundtrip(p1)
    assert p1.tensors.keys() == p2.tensors.keys()
    for k in p1.tensors:
        assert np.array_equal(p1.tensors[k], p2.tensors[k])
    assert p1.bpw == p1.nbytes * 8 / w.numel()
    return p1
