"""BiLLM-style binarization ("billm" format)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salomi.errors import SalomiError
from salomi.quantizers.base import PackedLinear
from salomi.quantizers.gptq import weighted_error
from salomi.quantizers.spec import parse_method
from tests.quant_helpers import correlated, deterministic_roundtrip, roundtrip

torch.set_num_threads(1)


W, H = correlated(48, 96, salient=3)


def test_billm_beats_plain_binary() -> None:
    b = parse_method("binary").quantize(W)
    for spec in ("billm", "billm:s0", "billm:s8", "billm:s0.25"):
        p = parse_method(spec).quantize(W, H)
        assert weighted_error(W, p.dequantize(), H) < 0.5 * weighted_error(W, b.dequantize(), H)
        assert ((W - p.dequantize()) ** 2).sum() < ((W - b.dequantize()) ** 2).sum()


def test_bits_are_honest() -> None:
    p = parse_method("billm").quantize(W, H)
    o, n = 48, 96
    assert p.nbytes == n // 8 + 2 * o * n // 8 + o * 4 * 2
    assert p.bpw == p.nbytes * 8 / (o * n)


@pytest.mark.parametrize("spec", ["billm", "billm:s5", "billm:s0.1", "billm:s96", "billm+ls"])
def test_roundtrip_and_determinism(spec: str) -> None:
    q = parse_method(spec)
    deterministic_roundtrip(q, W, H)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(o=st.integers(1, 9), n=st.integers(1, 40), s=st.integers(0, 40), seed=st.integers(0, 99))
def test_round_trip_property(o: int, n: int, s: int, seed: int) -> None:
    w, h = correlated(o, max(n, 3), seed, ntok=64, salient=3)
    roundtrip(parse_method(f"billm:s{min(s, w.shape[1])}").quantize(w, h))


def test_impossible_settings_and_corruption() -> None:
    for spec in ("billm:s1.5", "billm:x", "billm:s-1", "billm:s0.1:3"):
        with pytest.raises(SalomiError):
            parse_method(spec)
    with pytest.raises(SalomiError):
        parse_method("billm:s97").quantize(W, H)
    p = parse_method("billm").quantize(W, H)
    with pytest.raises(SalomiError):
        PackedLinear(p.method, p.format, p.shape, dict(p.tensors, scale=p.tensors["scale"][:, :3]), p.params).validate()
    with pytest.raises(SalomiError):
        PackedLinear(
            p.method, p.format, p.shape, dict(p.tensors, colmask=p.tensors["colmask"][:-1]), p.params
        ).validate()
