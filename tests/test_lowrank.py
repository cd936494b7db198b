"""+lowrank:rR (composite "BASE+lowrank" formats)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salomi.errors import SalomiError
from salomi.quantizers.base import PackedLinear, storage_format
from salomi.quantizers.gptq import weighted_error
from salomi.quantizers.spec import parse_method
from tests.quant_helpers import correlated, roundtrip

torch.set_num_threads(1)


W, H = correlated(48, 96, low_rank=True)


@pytest.mark.parametrize(
    "base", ["rtn:2:g32", "gptq:2:g32:act", "binary", "gptq:ternary", "vq:d4:k16", "billm", "pbllm:0.05"]
)
def test_lowrank_reduces_error_and_costs_exactly_its_bytes(base: str) -> None:
    p = parse_method(base).quantize(W, H)
    r = 4
    q = parse_method(f"{base}+lowrank:r{r}").quantize(W, H)
    assert q.format == p.format + "+lowrank"
    extra = 48 * r + 48 * 2 + r * 96 + r * 2
    assert q.nbytes == p.nbytes + extra
    assert q.bpw - p.bpw == pytest.approx(extra * 8 / W.numel(), abs=1e-12)
    assert weighted_error(W, q.dequantize(), H) < 0.97 * weighted_error(W, p.dequantize(), H)
    roundtrip(q)


def test_lowrank_error_falls_with_rank_and_without_hessian() -> None:
    errs = [weighted_error(W, parse_method(f"binary+lowrank:r{r}").quantize(W, H).dequantize(), H) for r in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2]
    p = parse_method("binary+lowrank:r4").quantize(W, None)
    assert ((W - p.dequantize()) ** 2).sum() < ((W - parse_method("binary").quantize(W).dequantize()) ** 2).sum()


def test_composite_format_resolution() -> None:
    fmt = storage_format("grid+lowrank")
    assert fmt.name == "grid+lowrank"
    with pytest.raises(SalomiError):
        storage_format("nosuch+lowrank")
    with pytest.raises(SalomiError):
        storage_format("grid+nosuch")


@pytest.mark.parametrize("spec", ["gptq:2:g32+lowrank:r8+ls", "billm+lowrank:r2+ls", "vq:d4:k16+lowrank:r3+ls"])
def test_ls_on_lowrank_keeps_bytes_and_never_hurts(spec: str) -> None:
    base = spec[: -len("+ls")]
    p = parse_method(base).quantize(W, H)
    q1, q2 = parse_method(spec).quantize(W, H), parse_method(spec).quantize(W, H)
    assert q1.nbytes == p.nbytes and q1.format == p.format
    assert weighted_error(W, q1.dequantize(), H) <= weighted_error(W, p.dequantize(), H) * (1 + 1e-9)
    for k in q1.tensors:
        assert np.array_equal(q1.tensors[k], q2.tensors[k])
    roundtrip(q1)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(o=st.integers(1, 10), n=st.sampled_from([8, 16, 24]), r=st.integers(1, 8), seed=st.integers(0, 99))
def test_round_trip_property(o: int, n: int, r: int, seed: int) -> None:
    w, h = correlated(o, n, seed, ntok=64, low_rank=True)
    r = min(r, o, n)
    roundtrip(parse_method(f"gptq:2:g8+lowrank:r{r}").quantize(w, h))


def test_impossible_settings_and_corruption() -> None:
    with pytest.raises(SalomiError):
        parse_method("binary+lowrank:r49").quantize(W, H)
    for spec in ("binary+lowrank", "binary+lowrank:r0", "binary+lowrank:8"):
        with pytest.raises(SalomiError):
            parse_method(spec)
    with pytest.raises(SalomiError):
        parse_method("binary+lowrank:r2+lowrank:r2").quantize(W, H)
    p = parse_method("binary+lowrank:r4").quantize(W, H)
    for name, arr in (
        ("lowrank.v", p.tensors["lowrank.v"][:, :-1]),
        ("lowrank.u_scale", p.tensors["lowrank.u_scale"][:-1]),
    ):
        with pytest.raises(SalomiError):
            PackedLinear(p.method, p.format, p.shape, dict(p.tensors, **{name: arr}), p.params).validate()
    t = dict(p.tensors)
    del t["lowrank.u"]
    with pytest.raises(SalomiError):
        PackedLinear(p.method, p.format, p.shape, t, p.params).validate()
