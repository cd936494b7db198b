"""PB-LLM: sparse int8/fp16 salient weights + binary rest ("pbllm" format)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salomi.errors import SalomiError
from salomi.quantizers.base import PackedLinear
from salomi.quantizers.gptq import weighted_error
from salomi.quantizers.pbllm import decode_gaps, encode_gaps
from salomi.quantizers.spec import parse_method
from tests.quant_helpers import correlated, deterministic_roundtrip, roundtrip

torch.set_num_threads(1)


W, H = correlated(48, 96)


def test_error_decreases_with_fraction() -> None:
    fs = (0.0, 0.02, 0.05, 0.1, 0.3, 1.0)
    ps = [parse_method(f"pbllm:{f}").quantize(W, H) for f in fs]
    errs = [weighted_error(W, p.dequantize(), H) for p in ps]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert all(a.nbytes < b.nbytes for a, b in zip(ps, ps[1:]))
    assert ps[1].params["index"] == "gaps" and ps[-1].params["index"] == "bitmap"


def test_feedback_helps() -> None:
    a = parse_method("pbllm:0.05").quantize(W, H)
    b = parse_method("pbllm:0.05:noft").quantize(W, H)
    assert weighted_error(W, a.dequantize(), H) < weighted_error(W, b.dequantize(), H)


@pytest.mark.parametrize(
    "spec", ["pbllm:0", "pbllm:0.05", "pbllm:0.2:fp16", "pbllm:1", "pbllm:0.1:noft", "pbllm:0.05+ls"]
)
def test_roundtrip_bpw_determinism(spec: str) -> None:
    q = parse_method(spec)
    deterministic_roundtrip(q, W, H)


@settings(max_examples=30, deadline=None)
@given(o=st.integers(1, 6), n=st.integers(1, 700), density=st.floats(0, 1), seed=st.integers(0, 99))
def test_gap_code_round_trip(o: int, n: int, density: float, seed: int) -> None:
    mask = np.random.default_rng(seed).random((o, n)) < density * density * 0.2
    e, c = encode_gaps(mask)
    rows, cols = decode_gaps(e, c.astype(np.uint16), n)
    r0, c0 = np.nonzero(mask)
    assert np.array_equal(rows, r0) and np.array_equal(cols, c0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(o=st.integers(1, 8), n=st.integers(1, 300), f=st.floats(0, 1), fp16=st.booleans(), seed=st.integers(0, 99))
def test_layer_round_trip_property(o: int, n: int, f: float, fp16: bool, seed: int) -> None:
    w, h = correlated(o, n, seed, ntok=32)
    roundtrip(parse_method(f"pbllm:{f}" + (":fp16" if fp16 else "")).quantize(w, h))


def test_impossible_settings_and_corruption() -> None:
    for spec in ("pbllm", "pbllm:1.5", "pbllm:-0.1", "pbllm:x", "pbllm:0.1:int4"):
        with pytest.raises(SalomiError):
            parse_method(spec)
    p = parse_method("pbllm:0.05").quantize(W, H)
    gaps = p.tensors["sal_gaps"].copy()
    gaps[-1] = 200  # pushes the last salient column past the row
    with pytest.raises(SalomiError):
        PackedLinear(p.method, p.format, p.shape, dict(p.tensors, sal_gaps=gaps), p.params).validate()
    with pytest.raises(SalomiError):
        PackedLinear(p.method, p.format, p.shape, dict(p.tensors, sal_q=p.tensors["sal_q"][:-1]), p.params).validate()
    cnt = p.tensors["sal_count"].copy()
    cnt[0] += 1
    with pytest.raises(SalomiError):
        PackedLinear(p.method, p.format, p.shape, dict(p.tensors, sal_count=cnt), p.params).validate()
