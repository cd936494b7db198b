"""Property tests: packing is lossless and bits are accounted exactly."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from salomi.packing import container
from salomi.packing.bits import pack_rows, pack_trits, row_bytes, unpack_rows, unpack_trits
from salomi.quantizers.base import PackedLinear
from salomi.quantizers.simple import BinaryQuantizer, RTNQuantizer, TernaryQuantizer


@given(rows=st.integers(1, 9), n=st.integers(1, 70), bits=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_bits_roundtrip(rows: int, n: int, bits: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, n), dtype=np.uint8)
    packed = pack_rows(codes, bits)
    assert packed.shape == (rows, row_bytes(n, bits)) == (rows, (n * bits + 7) // 8)
    assert np.array_equal(unpack_rows(packed, n, bits), codes)


@given(rows=st.integers(1, 9), n=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_trits_roundtrip(rows: int, n: int, seed: int) -> None:
    t = np.random.default_rng(seed).integers(0, 3, (rows, n), dtype=np.uint8)
    packed = pack_trits(t)
    assert packed.shape == (rows, (n + 4) // 5) and packed.max() <= 242
    assert np.array_equal(unpack_trits(packed, n), t)


def _through_file(p: PackedLinear) -> PackedLinear:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "l.salomi"
        container.save(f, p.tensors, {})
        c = container.load(f)
        q = PackedLinear(p.method, p.format, p.shape, {k: np.array(v) for k, v in c.tensors.items()}, p.params)
        assert sum(c.nbytes(k) for k in c.tensors) == p.nbytes
        return q


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 12),
    groups=st.integers(1, 5),
    group=st.sampled_from([1, 3, 8, 13, 32, 64]),
    bits=st.integers(1, 4),
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
)
@example(out=1, groups=1, group=1, bits=1, seed=1, scale=1.0)  # one weight per group: tiny step, zero ~ -1e4
def test_rtn_pack_save_load_dequantize(out: int, groups: int, group: int, bits: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, groups * group, generator=g) * scale
    q = RTNQuantizer(bits, group)
    p = q.quantize(w)
    p.validate()
    before = p.dequantize()
    after = _through_file(p).dequantize()
    assert torch.equal(before, after)
    # bpw is the stored bytes, nothing else: codes + fp16 scale + fp16 zero per group.
    expected = out * row_bytes(groups * group, bits) + 2 * 2 * out * groups
    assert p.nbytes == expected and p.bpw == expected * 8 / (out * groups * group)
    # Nearest on its own grid: error at most half a step, plus the fp16 rounding of the zero point and of
    # the scale; the latter is multiplied by |q - z| ~ |w| / step, which is large for a degenerate group
    # (e.g. one weight: tiny step, huge zero), so it adds up to 2^-11 (|w| + step).
    step = torch.from_numpy(p.tensors["scale"].astype(np.float32)).repeat_interleave(group, 1)
    zero_ulp = torch.from_numpy(np.spacing(np.abs(p.tensors["zero"])).astype(np.float32)).repeat_interleave(group, 1)
    assert torch.isfinite(before).all()
    bound = step * (0.5 + zero_ulp / 2) * (1 + 1e-3) + (w.abs() + step) * 2.0**-11 * (1 + 1e-3) + 1e-6
    assert torch.all((before - w).abs() <= bound)


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 10), n=st.integers(1, 90), seed=st.integers(0, 2**31), ternary=st.booleans())
def test_sign_and_ternary_roundtrip(out: int, n: int, seed: int, ternary: bool) -> None:
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(seed))
    p = (TernaryQuantizer() if ternary else BinaryQuantizer()).quantize(w)
    p.validate()
    deq = p.dequantize()
    assert torch.equal(deq, _through_file(p).dequantize())
    if not ternary:
        assert torch.equal(torch.sign(deq), torch.where(w >= 0, 1.0, -1.0))
        assert p.nbytes == out * ((n + 7) // 8) + 2 * out
    else:
        assert p.nbytes == out * ((n + 4) // 5) + 2 * out
