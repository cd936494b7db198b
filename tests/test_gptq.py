"""GPTQ (grid / binary / ternary) and the +ls learned-scales wrapper."""

from __future__ import annotations

import numpy as np
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


W, H = correlated(48, 96)


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_beats_rtn_on_weighted_error(bits: int) -> None:
    rtn = parse_method(f"rtn:{bits}:g32").quantize(W)
    for spec in (f"gptq:{bits}:g32", f"gptq:{bits}:g32:act"):
        p = parse_method(spec).quantize(W, H)
        assert p.format == "grid" and p.bpw >= rtn.bpw
        assert weighted_error(W, p.dequantize(), H) < 0.8 * weighted_error(W, rtn.dequantize(), H)


@pytest.mark.parametrize(
    "spec,base", [("gptq:binary", "binary"), ("gptq:binary:g32:act", "binary:g32"), ("gptq:ternary", "ternary")]
)
def test_gptq_binary_ternary_beat_plain(spec: str, base: str) -> None:
    b = parse_method(base).quantize(W)
    p = parse_method(spec).quantize(W, H)
    assert p.format == b.format and p.nbytes == b.nbytes
    assert weighted_error(W, p.dequantize(), H) < 0.8 * weighted_error(W, b.dequantize(), H)


def test_act_order_perm_round_trips() -> None:
    p = parse_method("gptq:2:g32:act").quantize(W, H)
    perm = p.tensors["perm"]
    assert perm.dtype == np.int16 and np.array_equal(np.sort(perm), np.arange(96))
    assert not np.array_equal(perm, np.arange(96))
    roundtrip(p)
    # stored column j is weight column perm[j]: the per-group fp16 scales live in stored order
    deq = p.dequantize()
    assert weighted_error(W, deq, H) < weighted_error(W, parse_method("rtn:2:g32").quantize(W).dequantize(), H)


@pytest.mark.parametrize(
    "spec",
    [
        "gptq:2:g32",
        "gptq:3:g16:act",
        "gptq:4:g96",
        "gptq:binary",
        "gptq:binary:g32:act",
        "gptq:ternary:g16:act",
        "gptq:2:g32+ls",
        "gptq:binary:act+ls",
    ],
)
def test_roundtrip_bpw_determinism(spec: str) -> None:
    q = parse_method(spec)
    p1 = deterministic_roundtrip(q, W, H)
    p1.validate()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    o=st.integers(1, 12),
    ng=st.integers(1, 4),
    g=st.sampled_from([4, 8, 16]),
    kind=st.sampled_from(["2", "3", "binary", "ternary"]),
    act=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_packing_round_trip_property(o: int, ng: int, g: int, kind: str, act: bool, seed: int) -> None:
    w, h = correlated(o, ng * g, seed, ntok=64)
    spec = f"gptq:{kind}:g{g}" + (":act" if act else "")
    roundtrip(parse_method(spec).quantize(w, h))


def test_impossible_settings() -> None:
    with pytest.raises(SalomiError):
        parse_method("gptq:2:g50").quantize(W, H)
    with pytest.raises(SalomiError):
        parse_method("gptq:2").quantize(W, H)
    with pytest.raises(SalomiError):
        parse_method("gptq:9:g32")
    with pytest.raises(SalomiError):
        parse_method("gptq:2:g32").quantize(W, H[:10, :10])
    with pytest.raises(SalomiError):
        parse_method("gptq:binary+ls:3")


def test_validate_rejects_corruption() -> None:
    p = parse_method("gptq:2:g32:act").quantize(W, H)
    bad = PackedLinear(p.method, p.format, p.shape, dict(p.tensors, codes=p.tensors["codes"][:, :-1]), p.params)
    with pytest.raises(SalomiError):
        bad.validate()
    perm = p.tensors["perm"].copy()
    perm[0] = perm[1]
    with pytest.raises(SalomiError):
        PackedLinear(p.method, p.format, p.shape, dict(p.tensors, perm=perm), p.params).validate()


def test_dead_columns_and_no_hessian() -> None:
    h = H.clone()
    h[5, :] = 0
    h[:, 5] = 0
    p = parse_method("gptq:2:g32").quantize(W, h)
    assert torch.isfinite(p.dequantize()).all()
    parse_method("gptq:binary").quantize(W, None).validate()


@pytest.mark.parametrize("spec", ["gptq:2:g32:act", "gptq:binary:g32", "gptq:ternary", "rtn:3:g16"])
def test_learned_scales_never_hurt_and_keep_bpw(spec: str) -> None:
    p = parse_method(spec).quantize(W, H)
    q = parse_method(spec + "+ls").quantize(W, H)
    assert q.nbytes == p.nbytes and q.format == p.format
    e0, e1 = weighted_error(W, p.dequantize(), H), weighted_error(W, q.dequantize(), H)
    assert e1 <= e0 + 1e-9 * e0


def test_hessian_factor_does_not_depend_on_the_thread_count() -> None:
    """LAPACK's Cholesky of a 1536-wide Hessian rounds differently on 1 and 2 threads (1e-13-1e-9 in
    U before the fix); prepare_hessian factorises on one thread, so U and the files do not differ."""
    from salomi.quantizers.gptq import prepare_hessian

    n = torch.get_num_threads()
    try:
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(2048, 1536, generator=g) @ (torch.randn(1536, 1536, generator=g) / 1536**0.5 + torch.eye(1536))
            h, w = 2 * x.T @ x / 2048, torch.randn(8, 1536, generator=g)
            us = []
            for th in (1, 2):
                torch.set_num_threads(th)
                us.append(prepare_hessian(w, h)[1])
            assert torch.equal(us[0], us[1])
            assert torch.get_num_threads() == 2  # restored after the factorisation
    finally:
        torch.set_num_threads(n)


def test_one_thread_section_restores_each_threads_count_when_entries_overlap() -> None:
    """Two quantizations on two Python threads whose one-thread sections overlap, the main one
    leaving first: each thread gets its own count back (torch's OpenMP count is per thread)."""
    import threading

    from salomi.quantizers.gptq import _one_cpu_thread

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    inside, release, seen = threading.Event(), threading.Event(), []

    def other() -> None:
        before = torch.get_num_threads()
        with _one_cpu_thread():
            inside.set()
            release.wait(10)
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads() == before)

    try:
        t = threading.Thread(target=other)
        with _one_cpu_thread():
            t.start()
            assert inside.wait(10)
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # back while the other section is still open
        release.set()
        t.join(10)
        assert seen == [1, True] and torch.get_num_threads() == 2
    finally:
        release.set()
        torch.set_num_threads(n)
