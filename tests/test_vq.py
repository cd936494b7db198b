"""Hessian-weighted vector quantization ("vq" format)."""

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
from salomi.quantizers.vq import pack_codes, unpack_codes
from tests.quant_helpers import correlated, deterministic_roundtrip, roundtrip

torch.set_num_threads(1)


W, H = correlated(64, 96)


def test_error_decreases_with_codebook_size() -> None:
    errs = [weighted_error(W, parse_method(f"vq:d4:k{k}").quantize(W, H).dequantize(), H) for k in (4, 16, 64, 256)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_feedback_helps_and_bpw_is_honest() -> None:
    ft = parse_method("vq:d4:k64").quantize(W, H)
    noft = parse_method("vq:d4:k64:noft").quantize(W, H)
    assert weighted_error(W, ft.dequantize(), H) < weighted_error(W, noft.dequantize(), H)
    n = 64 * 96
    expected = (64 * (96 // 4 * 6 // 8) + 64 * 4 * 2 + 64 * 2) * 8 / n  # 6-bit codes + fp16 codebook + fp16 row scales
    assert ft.bpw == ft.nbytes * 8 / n == expected


@pytest.mark.parametrize(
    "spec", ["vq:d2:k16", "vq:d4:k256", "vq:d8:k512", "vq:d6:k300:noft", "vq:d4:k64+ls", "vq:d2:k2048"]
)
def test_roundtrip_and_determinism(spec: str) -> None:
    q = parse_method(spec)
    deterministic_roundtrip(q, W, H)


def test_seed_changes_codebook() -> None:
    from salomi.quantizers.vq import VQQuantizer

    a = VQQuantizer(4, 16, seed=0).quantize(W, H)
    b = VQQuantizer(4, 16, seed=1).quantize(W, H)
    assert not np.array_equal(a.tensors["codebook"], b.tensors["codebook"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 5), n=st.integers(1, 40), bits=st.integers(1, 16), seed=st.integers(0, 99))
def test_code_packing_round_trip(rows: int, n: int, bits: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, n))
    packed = pack_codes(codes, bits)
    assert packed.shape == (rows, (n * bits + 7) // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack_codes(packed, n, bits).astype(np.int64), codes)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(o=st.integers(2, 8), nv=st.integers(1, 6), d=st.integers(2, 8), kb=st.integers(1, 4), seed=st.integers(0, 99))
def test_vq_layer_round_trip_property(o: int, nv: int, d: int, kb: int, seed: int) -> None:
    w, h = correlated(o, nv * d, seed, ntok=64)
    k = min(1 << kb, o * nv)
    if k < 2:
        return
    roundtrip(parse_method(f"vq:d{d}:k{k}").quantize(w, h))


def test_impossible_settings() -> None:
    for spec in ("vq:d1:k16", "vq:d9:k16", "vq:d4:k1", "vq:d4:k70000", "vq:d4", "vq:d4:k16:foo"):
        with pytest.raises(SalomiError):
            parse_method(spec)
    with pytest.raises(SalomiError):  # 5 does not divide 96
        parse_method("vq:d5:k16").quantize(W, H)
    with pytest.raises(SalomiError):  # more codewords than vectors
        parse_method("vq:d8:k1024").quantize(W, H)


def test_validate_rejects_corruption() -> None:
    p = parse_method("vq:d4:k5").quantize(W, H)  # 3-bit codes, values 5..7 are out of range
    codes = p.tensors["codes"].copy()
    codes[0, 0] |= 0b111
    with pytest.raises(SalomiError):
        PackedLinear(p.method, p.format, p.shape, dict(p.tensors, codes=codes), p.params).validate()
    with pytest.raises(SalomiError):
        PackedLinear(
            p.method, p.format, p.shape, dict(p.tensors, codebook=p.tensors["codebook"][:-1]), p.params
        ).validate()
    with pytest.raises(SalomiError):
        PackedLinear(
            p.method, p.format, p.shape, dict(p.tensors, scale=p.tensors["scale"].astype(np.float32)), p.params
        ).validate()


def test_k_means_weights_do_not_depend_on_the_thread_count() -> None:
    """torch's float32 mean of a 1536x576 layer's weights differs by thread count; the normaliser
    must not (a one-ulp change gave a budget file other codes)."""
    from salomi.quantizers.vq import unit_mean

    g = torch.Generator().manual_seed(0)
    wx = (torch.rand(884_736, generator=g) * torch.rand(884_736, generator=g) * 3).reshape(-1, 4)
    n = torch.get_num_threads()
    try:
        outs = []
        for th in (1, 2):
            torch.set_num_threads(th)
            outs.append(unit_mean(wx))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], wx / float(np.mean(wx.numpy(), dtype=np.float64)))
