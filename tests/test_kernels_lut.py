"""int8-activation kernels (csrc/lut.c, packed_matmul(..., activations="int8")).

Contract (kernels.h): each activation row is quantized per weight scale group g:
    amax_g = max_{j in g} |x_j|,  sx_g = amax_g / 127,
    xq_j = round_half_even(x_j * float32(127 / amax_g))  in [-127, 127]
and, with w_j = s_g (q_j - z_g) (sign: q = 2b, z = 1; ternary: q = t, z = 1; 2-bit grid:
codes and fp16 zero points, in stored column order when the layer has a permutation),
    y = sum_g s_g * sx_g * (sum_{j in g} q_j xq_j - z_g * sum_{j in g} xq_j)
with the integer sums exact.

Checked here:
 (a) against an exact reference in float64 that applies the same quantization
     (`quantize_ref`, written from the contract, not from the C code): per output
         |y - y_int| <= 3e-5 * sum_g |s_g| sx_g sum_{j in g} (|q_j| + |z_g|) |xq_j|
     i.e. float32 rounding only;
 (b) against the float reference x @ dequantize(W)^T with the rigorous bound
         |y - y_float| <= sum_g |s_g| * (sx_g / 2) * sum_{j in g} |q_j - z_g|  (+ the (a) term
         and 1e-5 ||x|| ||w|| for float rounding),
     which is at most max|x_g| / 254 per unit of |w|. Measured: the error is 4-10% of
     that bound; relative L2 error of an output row vs the float kernel 0.6-1.0% for
     Gaussian activations (2-bit grid 0.4-0.7%), 1.4-1.9% (G = 64) and 4.5-7% (G = in) with x20 outlier
     channels (numbers above test_relative_error_is_small);
 (c) scalar and AVX2 give bit-identical results, and so do all thread counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salomi.errors import SalomiError
from salomi.packing.bits import pack_rows, pack_trits, unpack_rows, unpack_trits
from salomi.quantizers.base import PackedLinear
from salomi.quantizers.simple import BinaryQuantizer, TernaryQuantizer
from salomi.runtime import kernels

# every ISA the CPU has: scalar, avx2, avx512 (the int8 kernels must agree bit for bit on all)
ISAS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(kernels.cpu_isa()) + 1]


def quantize_ref(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented activation quantization, in float32 like the kernels: (xq, sx)."""
    m, i = x.shape
    xg = x.reshape(m, i // group, group)
    amax = xg.abs().amax(dim=2)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    inv = torch.tensor(127.0, dtype=torch.float32) / safe
    xq = torch.round(xg * inv[:, :, None]).clamp(-127, 127)
    xq = torch.where((amax > 0)[:, :, None], xq, torch.zeros_like(xq))
    return xq.reshape(m, i), amax / torch.tensor(127.0, dtype=torch.float32)


def stored(p: PackedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """In stored column order: integer codes q [out, in], float64 scales and zero points
    [out, ng] with w = s (q - z) (sign: q = 2b, z = 1; ternary: q = t, z = 1), and the
    column permutation (stored column j is weight column perm[j]) or None."""
    o, i = p.shape
    s = torch.from_numpy(p.tensors["scale"].astype(np.float64))
    perm = None
    if p.format == "sign":  # w = s (2b - 1) = s (q - z) with q = 2b, z = 1
        q = unpack_rows(p.tensors["bits"], i, 1).astype(np.int64) * 2
        z = torch.ones_like(s)
    elif p.format == "ternary":  # w = s (t - 1)
        q = unpack_trits(p.tensors["trits"], i).astype(np.int64)
        z = torch.ones_like(s)
    else:
        q = unpack_rows(p.tensors["codes"], i, int(p.params["bits"])).astype(np.int64)
        z = torch.from_numpy(p.tensors["zero"].astype(np.float64))
        if "perm" in p.tensors:
            perm = torch.from_numpy(np.asarray(p.tensors["perm"]).astype(np.int64))
    return torch.from_numpy(q), s, z, perm


def check(y: torch.Tensor, x: torch.Tensor, p: PackedLinear) -> float:
    """Assert (a) and (b); return the largest error / bound(b) ratio."""
    g = int(p.params["group"])
    x2 = x.reshape(-1, x.shape[-1])
    q, s, z, perm = stored(p)
    xs = x2 if perm is None else x2[:, perm]  # activations in stored column order
    xq, sx = quantize_ref(xs, g)
    m, i = x2.shape
    o = q.shape[0]
    ng = i // g
    xqg = xq.double().reshape(m, 1, ng, g)
    qg = q.double().reshape(1, o, ng, g)
    X = xqg.sum(-1)  # [m, 1, ng]
    w_sx = s[None, :, :] * sx.double()[:, None, :]  # [m, o, ng]
    y_int = (w_sx * ((xqg * qg).sum(-1) - z[None] * X)).sum(-1)
    mag = (w_sx.abs() * ((xqg.abs() * qg.abs()).sum(-1) + z.abs()[None] * xqg.abs().sum(-1))).sum(-1)
    yd = y.reshape(m, o).double()
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], o)
    assert torch.isfinite(yd).all()
    err_int = (yd - y_int).abs()
    bound_a = 3e-5 * mag + 1e-30
    assert (err_int <= bound_a).all(), f"(a) max err {err_int.max():.3g}, worst ratio {(err_int / bound_a).max():.3g}"
    w = p.dequantize().double()
    y_f = x2.double() @ w.T
    qz = (qg - z[None, :, :, None]).abs().sum(-1)  # sum_j |q_j - z_g| = sum_j |w_j| / |s_g|
    quant = (s.abs()[None] * (sx.double()[:, None, :] / 2) * qz).sum(-1) * (1 + 1e-6)
    bound_b = quant + bound_a + 1e-5 * x2.double().norm(dim=1)[:, None] * w.norm(dim=1)[None, :]
    err_f = (yd - y_f).abs()
    assert (err_f <= bound_b).all(), f"(b) max err {err_f.max():.3g}, worst ratio {(err_f / bound_b).max():.3g}"
    return float((err_f / (quant + 1e-30)).max())


def random_layer(fmt: str, o: int, i: int, g: int, rng: np.random.Generator, perm: bool = False) -> PackedLinear:
    ng = i // g
    scale = (rng.uniform(0.01, 2.0, (o, ng)) * rng.choice([-1.0, 1.0], (o, ng), p=[0.1, 0.9])).astype(np.float16)
    params: dict = {"group": g}
    if fmt == "sign":
        t = {"bits": pack_rows(rng.integers(0, 2, (o, i)), 1), "scale": scale}
    elif fmt == "ternary":
        t = {"trits": pack_trits(rng.integers(0, 3, (o, i))), "scale": scale}
    else:  # 2-, 4- or 8-bit grid with random zero points (and optionally a column permutation)
        bits = int(fmt[4:])
        top = (1 << bits) - 1
        t = {
            "codes": pack_rows(rng.integers(0, top + 1, (o, i)), bits),
            "scale": scale,
            "zero": rng.uniform(-0.5, top + 0.5, (o, ng)).astype(np.float16),
        }
        if perm:
            t["perm"] = rng.permutation(i).astype(np.int32)
        fmt, params = "grid", {"bits": bits, "group": g}
    p = PackedLinear("t", fmt, (o, i), t, params)
    p.validate()
    return p


def run_isas(x: torch.Tensor, p: PackedLinear, threads: int = 2) -> torch.Tensor:
    """Run on every ISA; they must agree bit for bit. Returns the result."""
    outs = []
    try:
        for name in ISAS:
            kernels.set_isa(name)
            outs.append(kernels.packed_matmul(x, p, threads, activations="int8"))
    finally:
        kernels.set_isa("auto")
    for other in outs[1:]:
        assert torch.equal(outs[0], other), "scalar and SIMD int8 kernels disagree"
    return outs[0]


# (out, in, group): 1 row, in = 5 / 7, in not a multiple of 8/32/5/16-byte chunks, groups that
# straddle sign and ternary bytes, G = 1, G = in, many groups, the model's shapes.
SHAPES = [
    (1, 5, 5),
    (3, 7, 7),
    (1, 1, 1),
    (4, 5, 1),
    (6, 20, 4),
    (5, 30, 3),
    (9, 100, 5),
    (7, 129, 129),
    (11, 200, 8),
    (2, 250, 25),
    (5, 576, 64),
    (13, 576, 192),
    (9, 1000, 40),
    (6, 1283, 1283),
    (3, 1536, 64),
    (10, 2600, 104),
    (4, 2600, 2600),
    (33, 1536, 1536),
    # sign bit-plane layout (G in {32, 64, 128} or a multiple of 256), full and partial 256-column chunks
    (5, 96, 32),
    (3, 160, 32),
    (3, 384, 128),
    (4, 768, 256),
    (2, 1536, 768),
    (7, 2560, 512),
    (1, 64, 64),
]


@pytest.mark.parametrize("fmt", ["sign", "ternary"])
def test_random_shapes(fmt):
    rng = np.random.default_rng(len(fmt))
    for o, i, g in SHAPES:
        p = random_layer(fmt, o, i, g, rng)
        for m in (1, 3, 8):
            x = torch.from_numpy(rng.standard_normal((m, i)).astype(np.float32))
            check(run_isas(x, p), x, p)


# 2-bit grid: group 16 / 32 / 64 / 128 or a multiple of 128; partial 128-column chunks, 1 row.
GRID2_SHAPES = [
    (1, 16, 16),
    (3, 48, 16),
    (5, 96, 32),
    (4, 160, 32),
    (6, 576, 64),
    (3, 128, 128),
    (7, 640, 128),
    (2, 1536, 768),
    (9, 384, 384),
    (5, 2560, 256),
    (8, 256, 64),  # AVX-512: exactly one chunk pair
    (5, 1536, 64),  # six pairs
    (3, 272, 16),  # a last pair with one chunk of 16 columns
]


# 8-bit grid (the head / embedding format): any group that is a multiple of 32.
GRID8_SHAPES = [(1, 32, 32), (3, 64, 32), (5, 576, 64), (4, 576, 576), (7, 1536, 96), (2, 1536, 1536), (9, 640, 128)]
# 4-bit grid (head format): group a multiple of 32, rows a multiple of 64 columns; groups of 32 / 96 / 288
# put two groups in one 64-column chunk.
GRID4_SHAPES = [(1, 64, 32), (3, 64, 64), (5, 576, 64), (6, 576, 32), (4, 576, 576), (7, 1536, 96), (2, 576, 288),
                (9, 640, 128), (5, 1536, 1536)]


@pytest.mark.parametrize(
    "fmt,shapes,seed", [("grid2", GRID2_SHAPES, 11), ("grid4", GRID4_SHAPES, 31), ("grid8", GRID8_SHAPES, 21)]
)
@pytest.mark.parametrize("perm", [False, True])
def test_grid_random_shapes(fmt, shapes, seed, perm):
    rng = np.random.default_rng(seed + perm)
    for o, i, g in shapes:
        p = random_layer(fmt, o, i, g, rng, perm)
        assert kernels.int8_supported(p)
        for m in (1, 3, 8):
            x = torch.from_numpy(rng.standard_normal((m, i)).astype(np.float32))
            check(run_isas(x, p), x, p)


def test_grid4_extreme_codes_do_not_saturate():
    """Codes 15 against activations at +-127 everywhere: the int16 sum of both maddubs halves
    reaches 4 * 15 * 127 = 7620 per lane, and one row mixes codes 0 and 15."""
    i, g = 576, 64
    codes = np.full((3, i), 15, dtype=np.int64)
    codes[1] = np.where(np.arange(i) % 3 == 0, 0, 15)
    codes[2] = np.arange(i) % 16
    p = PackedLinear("t", "grid", (3, i), {"codes": pack_rows(codes, 4), "scale": np.ones((3, i // g), np.float16),
                                           "zero": np.full((3, i // g), 7.5, np.float16)}, {"bits": 4, "group": g})
    x = torch.from_numpy(np.stack([np.full(i, -1.0), np.full(i, 1.0), np.where(np.arange(i) % 2, 1.0, -1.0)])
                         .astype(np.float32))
    y = run_isas(x, p)
    check(y, x, p)
    torch.testing.assert_close(y.double(), x.double() @ p.dequantize().double().T, rtol=1e-6, atol=1e-3)


def test_grid8_extreme_codes_do_not_saturate():
    """Codes 0 and 255 (q' = -128 / 127) against activations at +-127 in every pair: the
    int16 pair sums of maddubs reach +-32512, just inside int16, and stay exact."""
    i, g = 256, 64
    codes = np.tile(np.array([0, 255, 0, 0, 255, 255, 128, 0], dtype=np.int64), (4, i // 8))
    codes[1] = 0
    codes[2] = 255
    p = PackedLinear("t", "grid", (4, i), {"codes": pack_rows(codes, 8), "scale": np.ones((4, i // g), np.float16),
                                           "zero": np.zeros((4, i // g), np.float16)}, {"bits": 8, "group": g})
    x = torch.from_numpy(np.stack([np.full(i, -1.0), np.full(i, 1.0), np.where(np.arange(i) % 2, 1.0, -1.0)])
                         .astype(np.float32))
    y = run_isas(x, p)
    check(y, x, p)
    torch.testing.assert_close(y.double(), x.double() @ p.dequantize().double().T, rtol=1e-6, atol=1e-3)


# Every shape of the AVX-512 VNNI grid kernels (grid4 g32 / g64 / g128, grid8 g32 / g64 and
# beyond): a 128-column pair split over groups, a last single 64-column chunk (in % 128 == 64)
# or 32-column group (grid8, odd group count), 1 row and row counts that leave a remainder
# after the strided 8-row passes and the 4-row blocks, with extreme codes against +-127 activations.
GRID_ISA_SHAPES = [
    (4, 32, 64), (4, 32, 576), (4, 32, 1536), (4, 64, 64), (4, 64, 576), (4, 64, 1536), (4, 128, 128),
    (4, 128, 640), (4, 128, 1536), (4, 256, 1536), (8, 32, 32), (8, 32, 96), (8, 32, 576), (8, 64, 64),
    (8, 64, 576), (8, 64, 1536), (8, 128, 640), (8, 192, 576),
]


@pytest.mark.parametrize("bits,g,i", GRID_ISA_SHAPES)
def test_grid_int8_isas_agree_extremes(bits, g, i):
    rng = np.random.default_rng(bits * 10000 + g * 10 + i)
    top = (1 << bits) - 1
    ramp = np.arange(i)
    codes = np.stack([
        np.full(i, top), np.zeros(i, np.int64), np.where(ramp % 2, top, 0), np.where(ramp % 5 < 2, 0, top),
        ramp % (top + 1), rng.integers(0, top + 1, i), rng.integers(0, top + 1, i),
    ]).astype(np.int64)
    codes = np.concatenate([codes, codes[::-1], codes[3:], codes[:3], codes[1::-1], codes[:1:-1]])  # 28 rows
    o, ng = codes.shape[0], i // g
    scale = (rng.uniform(0.01, 2.0, (o, ng)) * rng.choice([-1.0, 1.0], (o, ng))).astype(np.float16)
    zero = rng.uniform(-0.5, top + 0.5, (o, ng)).astype(np.float16)
    xs = np.stack([
        np.full(i, 1.0), np.full(i, -1.0), np.where(ramp % 2, 1.0, -1.0), np.where(ramp % 7 < 3, -1.0, 1.0),
        rng.standard_normal(i), np.where(ramp % 61 == 0, 50.0, rng.standard_normal(i)),
    ]).astype(np.float32)
    for rows in (o, 1, 5, 13, 27):  # AVX-512 passes of 8 rows strided by q = rows per thread // 8, then 4 and 1
        p = PackedLinear("t", "grid", (rows, i), {"codes": pack_rows(codes[:rows], bits), "scale": scale[:rows],
                                                  "zero": zero[:rows]}, {"bits": bits, "group": g})
        p.validate()
        assert kernels.int8_supported(p)
        for xb in (xs[:4], xs[4:5], xs):  # +-127 patterns alone, one Gaussian row, all
            x = torch.from_numpy(xb)
            check(run_isas(x, p, threads=1 + rows % 2), x, p)


@pytest.mark.parametrize("fmt", ["sign", "ternary", "grid2", "grid4", "grid8"])
def test_adversarial_activations(fmt):
    """Zeros, zero groups, huge and tiny values, exact rounding ties, one outlier."""
    rng = np.random.default_rng(3)
    i, g = 640, 64
    p = random_layer(fmt, 21, i, g, rng)
    rows = [
        np.zeros(i),
        np.concatenate([np.zeros(g), rng.standard_normal(i - g)]),  # an all-zero group
        rng.standard_normal(i) * 1e30,
        rng.standard_normal(i) * 1e-30,  # subnormal-range activations
        np.where(np.arange(i) % 97 == 0, 1e4, rng.standard_normal(i)),  # outlier columns
        np.full(i, -3.0),
    ]
    ties = np.tile((np.arange(g) - 31.5) / 127.0, i // g)  # x * 127 / amax hits k + 1/2 exactly
    ties[::g] = 63.5 / 127.0 * 2  # amax of every group = 1
    rows.append(ties)
    x = torch.from_numpy(np.stack(rows).astype(np.float32))
    y = run_isas(x, p)
    check(y, x, p)
    assert torch.equal(y[0], torch.zeros_like(y[0]))


def test_every_byte_value():
    rng = np.random.default_rng(7)
    bits = np.unpackbits(
        np.stack([rng.permutation(256) for _ in range(3)]).astype(np.uint8), axis=1, bitorder="little"
    ).reshape(3, 2048)
    sign = PackedLinear(
        "t",
        "sign",
        (3, 2048),
        {"bits": pack_rows(bits, 1), "scale": rng.uniform(0.5, 1, (3, 32)).astype(np.float16)},
        {"group": 64},
    )
    digits = (np.arange(243)[:, None] // np.array([1, 3, 9, 27, 81])) % 3
    trits = np.stack([digits[rng.permutation(243)].reshape(-1) for _ in range(3)])
    tern = PackedLinear(
        "t",
        "ternary",
        (3, 1215),
        {"trits": pack_trits(trits), "scale": rng.uniform(0.5, 1, (3, 5)).astype(np.float16)},
        {"group": 243},
    )
    assert np.array_equal(np.sort(tern.tensors["trits"][0]), np.arange(243))
    for layer in (sign, tern):
        layer.validate()
        for m in (1, 4):
            x = torch.randn(m, layer.shape[1])
            check(run_isas(x, layer), x, layer)


def test_threads_and_batch_shapes():
    rng = np.random.default_rng(5)
    for fmt in ("sign", "ternary", "grid2"):
        p = random_layer(fmt, 45, 576, 64, rng)
        x = torch.randn(2, 3, 576)
        ref = kernels.packed_matmul(x, p, threads=1, activations="int8")
        assert ref.shape == (2, 3, 45)
        check(ref, x, p)
        for t in (2, 3, 5, 64):
            assert torch.equal(kernels.packed_matmul(x, p, threads=t, activations="int8"), ref)
        assert kernels.packed_matmul(torch.empty(0, 576), p, activations="int8").shape == (0, 45)
        assert kernels.packed_matmul(torch.randn(576), p, activations="int8").shape == (45,)


def test_non_finite_activation_gives_nan_row():
    p = random_layer("sign", 9, 128, 64, np.random.default_rng(1))
    x = torch.randn(2, 128)
    x[1, 100] = float("nan")
    y = kernels.packed_matmul(x, p, activations="int8")
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()
    x[1, 100] = float("inf")
    assert torch.isnan(kernels.packed_matmul(x, p, activations="int8")[1]).all()


# Measured (seed 3, 16 rows): relative L2 error per row of int8 vs float kernel, mean / max
#   Gaussian x:                       binary:g64 0.63% / 0.74%, binary (G = in) 0.80% / 1.00%,
#                                     ternary:g64 0.59% / 0.69%, ternary (G = in) 0.80% / 1.00%
#   every 211th channel x20 outlier:  binary:g64 1.6% / 1.9%,   binary (G = in) 4.7% / 7.0%,
#                                     ternary:g64 1.4% / 1.8%,  ternary (G = in) 4.5% / 6.7%
# and the largest error / bound (b) ratio was 0.04-0.10. (For scale: the binary weights
# themselves are ~60% off the float weights.) Limits below are ~1.5x the measured max.
LIMITS = {
    ("binary:g64", 1): 0.012,
    ("binary", 1): 0.015,
    ("ternary:g64", 1): 0.012,
    ("ternary", 1): 0.015,
    ("binary:g64", 20): 0.03,
    ("binary", 20): 0.11,
    ("ternary:g64", 20): 0.03,
    ("ternary", 20): 0.11,
}


@pytest.mark.parametrize(
    "q", [BinaryQuantizer(64), BinaryQuantizer(), TernaryQuantizer(64), TernaryQuantizer()], ids=lambda q: q.spec
)
@pytest.mark.parametrize("outlier", [1, 20])
def test_relative_error_is_small(q, outlier):
    """Real quantizers, Gaussian activations (optionally with outlier channels): the
    int8 result stays close to the float kernel and far inside bound (b)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(96, 1536, generator=gen) * 0.02
    p = q.quantize(w)
    x = torch.randn(16, 1536, generator=gen)
    x[:, ::211] *= outlier
    y8 = kernels.packed_matmul(x, p, activations="int8")
    yf = kernels.packed_matmul(x, p)
    rel = ((y8 - yf).norm(dim=1) / yf.norm(dim=1)).max().item()
    assert rel < LIMITS[(q.spec, outlier)], (q.spec, rel)
    assert check(y8, x, p) < 0.2  # typical error is far below the worst-case bound


def test_errors():
    p = random_layer("sign", 4, 64, 64, np.random.default_rng(0))
    with pytest.raises(ValueError):
        kernels.packed_matmul(torch.randn(1, 64), p, activations="int4")

    def grid(bits: int, g: int) -> PackedLinear:
        return PackedLinear(
            "t",
            "grid",
            (4, 192),
            {
                "codes": pack_rows(np.zeros((4, 192), dtype=np.int64), bits),
                "scale": np.ones((4, 192 // g), np.float16),
                "zero": np.ones((4, 192 // g), np.float16),
            },
            {"bits": bits, "group": g},
        )

    rows96 = random_layer("grid4", 4, 96, 32, np.random.default_rng(0))  # 4 bits need rows of whole 64 columns
    for bad in (grid(3, 64), grid(2, 48), grid(2, 192), grid(2, 8), grid(8, 48), grid(8, 16), grid(4, 16), rows96):
        assert not kernels.int8_supported(bad)
        with pytest.raises(ValueError):
            kernels.packed_matmul(torch.randn(1, bad.shape[1]), bad, activations="int8")
        assert kernels.packed_matmul(torch.randn(1, bad.shape[1]), bad).shape == (1, 4)  # float path unaffected
    assert kernels.int8_supported(grid(2, 64)) and kernels.int8_supported(grid(8, 64))
    assert kernels.int8_supported(grid(4, 32)) and kernels.int8_supported(grid(4, 192))
    assert kernels.int8_supported(grid(8, 192))
    with pytest.raises(SalomiError):
        kernels.packed_matmul(
            torch.randn(1, 64), PackedLinear("t", "sign", (4, 64), dict(p.tensors), {"group": 48}), activations="int8"
        )


def tables_ref(x: torch.Tensor, p: PackedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 table kernel's contract (engine.h), in float64 from float32 tables: (y_int, bound vs float).

    Sign: vector columns of 4 weight columns, code = the 4 sign bits, 16 entries.
    Ternary: vector columns of 5 (the last one zero-padded), code = the file's byte (five trits),
    243 entries padded to 256. Blocks of 32 vectors. The vector columns form two halves [0, h),
    [h, nv) with h = nv // 4 * 2; per block from its half's start each vector's table entries
    are built in float32 (a mul, then one FMA per further column: here float32 products and sums
    in that order), quantized with one scale m / 127 (m = the block's max |entry|, inv = 127 / m
    in float32, round half to even); a row sums the int8 entries of its codes.
    Bound vs x @ W^T: |s_row| * sum_blocks (vectors in block) * scale / 2."""
    o, i = p.shape
    if p.format == "sign":
        d, blk = 4, 32
        bits = torch.from_numpy(unpack_rows(p.tensors["bits"], i, 1).astype(np.int64))  # [o, i]
        nv = i // 4
        codes = (bits.reshape(o, nv, 4) * torch.tensor([1, 2, 4, 8])).sum(-1)  # [o, nv]
        pat = torch.tensor([[1.0 if (c >> t) & 1 else -1.0 for t in range(4)] for c in range(16)])  # [16, 4]
    else:
        d, blk = 5, 32
        nv = (i + 4) // 5
        codes = torch.from_numpy(p.tensors["trits"].astype(np.int64))  # [o, nv]
        pat = torch.tensor([[float((c // 3**t) % 3 - 1) if c < 243 else 0.0 for t in range(5)] for c in range(256)])
    s = torch.from_numpy(p.tensors["scale"].astype(np.float64))[:, 0]
    ys, bounds = [], []
    for row in x.reshape(-1, i):
        xv = torch.cat([row, row.new_zeros(nv * d - i)]).reshape(nv, d)
        tab = pat[None, :, 0] * xv[:, None, 0]
        for t in range(1, d):
            tab = tab + pat[None, :, t] * xv[:, None, t]  # float32; exact products of +-1/0, so FMA == mul + add
        y, b = torch.zeros(o, dtype=torch.float64), torch.zeros(o, dtype=torch.float64)
        h = nv // 4 * 2
        for v0, v1 in [(a, min(a + blk, h)) for a in range(0, h, blk)] + [(a, min(a + blk, nv)) for a in range(h, nv, blk)]:
            part = tab[v0:v1]
            m = part.abs().max()
            inv = torch.tensor(127.0) / m if m > 0 else torch.tensor(0.0)
            q = torch.round(part * inv).double()  # [nb, k]
            scale = float(m) / 127.0
            sums = q.gather(1, codes[:, v0:v1].T).sum(0)  # [o]
            y += scale * sums
            b += part.shape[0] * scale / 2
        ys.append(y * s)
        bounds.append(b * s.abs())
    return torch.stack(ys).reshape(*x.shape[:-1], o), torch.stack(bounds).reshape(*x.shape[:-1], o)


@pytest.mark.parametrize(
    "fmt,o,i",
    [("sign", 1, 8), ("sign", 33, 64), ("sign", 45, 136), ("sign", 64, 576), ("sign", 7, 1536), ("sign", 96, 1024), ("sign", 5, 8200),
     ("sign", 300, 576), ("sign", 520, 64), ("sign", 264, 2048), ("sign", 300, 4104),
     ("ternary", 1, 1), ("ternary", 1, 7), ("ternary", 33, 64), ("ternary", 65, 576), ("ternary", 7, 1536),
     ("ternary", 96, 1000), ("ternary", 130, 41), ("ternary", 300, 576), ("ternary", 256, 100)],
)
def test_tables_kernel(fmt, o, i):
    """T-MAC int8 tables (the engine's kernel for per-row-scale sign and ternary layers with
    int8): exact integer sums (a), within the documented table-rounding bound of the float
    product (b), identical bits on every ISA and thread count."""
    rng = np.random.default_rng(o * 7 + i)
    p = random_layer(fmt, o, i, i, rng)
    assert kernels.tables_supported(p)
    t = kernels.tables(p)
    for m in (1, 3):
        x = torch.from_numpy((rng.standard_normal((m, i)) * np.where(rng.random(i) < 0.02, 20, 1)).astype(np.float32))
        outs = []
        try:
            for name in ISAS:
                kernels.set_isa(name)
                for th in (1, 2, 3):
                    outs.append(kernels.tables_matmul(x, t, threads=th))
        finally:
            kernels.set_isa("auto")
        assert all(torch.equal(outs[0], y) for y in outs[1:])
        y = outs[0].double()
        y_int, bound = tables_ref(x, p)
        mag = bound * 2 * 127  # = |s| sum_blocks (vectors) max|entry| >= sum of |table entries| used
        assert ((y - y_int).abs() <= 1e-6 * mag + 1e-30).all(), float((y - y_int).abs().max())
        y_f = x.double() @ p.dequantize().double().T
        assert ((y - y_f).abs() <= bound * (1 + 1e-5) + 1e-5 * y_f.abs().max()).all()


def test_ternary_tables_ignore_corrupt_bytes():
    """A trit byte > 242 (not a valid code) reads a zero table entry: never out of bounds."""
    rng = np.random.default_rng(5)
    p = random_layer("ternary", 40, 100, 100, rng)
    bad = p.tensors["trits"].copy()
    bad[3, 7] = 255
    q = PackedLinear("t", "ternary", p.shape, {"trits": bad, "scale": p.tensors["scale"]}, {"group": 100})
    good = p.tensors["trits"].copy()
    good[3, 7] = 121  # all five trits 1 = zero weights
    z = PackedLinear("t", "ternary", p.shape, {"trits": good, "scale": p.tensors["scale"]}, {"group": 100})
    x = torch.randn(1, 100)
    assert torch.equal(kernels.tables_matmul(x, kernels.tables(q)), kernels.tables_matmul(x, kernels.tables(z)))


def test_tables_refuse_other_layers():
    rng = np.random.default_rng(0)
    for p in (random_layer("sign", 4, 64, 32, rng), random_layer("sign", 4, 60, 60, rng),
              random_layer("ternary", 4, 64, 32, rng), random_layer("grid2", 4, 64, 64, rng)):
        assert not kernels.tables_supported(p)
        with pytest.raises(ValueError):
            kernels.tables(p)
