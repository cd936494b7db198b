"""C packed-matmul kernels (salomi.runtime.kernels) against p.dequantize() + torch matmul.

Every ISA the machine has is tested by forcing it (scalar, avx2, avx512). AVX-512 is
skipped only when /proc/cpuinfo confirms the CPU lacks it; if the CPU has it, the
kernels must use it.

Tolerance, per output element (m, o):
    |y - y_ref| <= TOL * ||x_m|| * ||w_o||                      (sign, ternary, RTN grid)
    |y - y_ref| <= TOL * ||x_m|| * || |s| (|q| + |z|) ||_o      (grid with random codes/zeros)
with TOL = 1e-4. The kernels accumulate s * (sum x q - z sum x) per group in float32, so
for grid the rounding error scales with |q| and |z|, not with |q - z| (which random
zero points can make arbitrarily small).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from salomi.errors import SalomiError
from salomi.packing.bits import pack_rows, pack_trits
from salomi.quantizers.base import PackedLinear
from salomi.quantizers.simple import BinaryQuantizer, RTNQuantizer, TernaryQuantizer
from salomi.runtime import kernels

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

pytestmark = pytest.mark.skipif(not kernels.available(), reason="salomi._kernels not built (pip install -e .)")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}, "avx2": {"avx2", "fma", "f16c"}}


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    name = request.param
    flags = _cpu_flags()
    supported = {
        "scalar": True,
        "avx2": kernels.cpu_isa() in ("avx2", "avx512"),
        "avx512": kernels.cpu_isa() == "avx512",
    }
    if name in _NEEDS and flags:
        # The library's own detection must agree with the CPU flags: a CPU that has the
        # instructions must never fall back silently.
        assert supported[name] == _NEEDS[name].issubset(flags), (name, kernels.cpu_isa())
    if not supported[name]:
        missing = sorted(_NEEDS[name] - flags)
        pytest.skip(f"CPU lacks {name} (missing flags: {missing}); those kernels are compiled but cannot run here")
    kernels.set_isa(name)
    assert kernels.isa() == name
    yield name
    kernels.set_isa("auto")


def _check(y: torch.Tensor, x: torch.Tensor, p: PackedLinear, wmag: torch.Tensor | None = None) -> None:
    w = p.dequantize().double()
    xd = x.reshape(-1, x.shape[-1]).double()
    ref = xd @ w.T
    bound = TOL * xd.norm(dim=1)[:, None] * (w if wmag is None else wmag.double()).norm(dim=1)[None, :]
    err = (y.reshape(ref.shape).double() - ref).abs()
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], p.shape[0])
    assert torch.isfinite(y).all()
    bad = err > bound + 1e-30
    assert not bad.any(), f"max err {err.max():.3g}, max err/bound {(err / (bound + 1e-30)).max():.3g}"


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def random_layer(fmt: str, o: int, i: int, g: int, rng: np.random.Generator, bits: int = 0, perm: bool = False):
    """A packed layer with uniformly random codes; returns (layer, |s|(|q|+|z|) magnitude or None)."""
    ng = i // g
    scale = _f16(rng.uniform(0.01, 2.0, (o, ng)) * rng.choice([-1.0, 1.0], (o, ng), p=[0.1, 0.9]))
    if fmt == "sign":
        p = PackedLinear(
            "t", "sign", (o, i), {"bits": pack_rows(rng.integers(0, 2, (o, i)), 1), "scale": scale}, {"group": g}
        )
        mag = None
    elif fmt == "ternary":
        p = PackedLinear(
            "t", "ternary", (o, i), {"trits": pack_trits(rng.integers(0, 3, (o, i))), "scale": scale}, {"group": g}
        )
        mag = None
    else:
        q = rng.integers(0, 1 << bits, (o, i))
        zero = _f16(rng.uniform(0, (1 << bits) - 1, (o, ng)))
        t = {"codes": pack_rows(q, bits), "scale": scale, "zero": zero}
        pm = rng.permutation(i) if perm else np.arange(i)
        if perm:
            t["perm"] = pm.astype(np.int16 if i <= 32767 else np.int32)
        p = PackedLinear("t", "grid", (o, i), t, {"bits": bits, "group": g})
        s = np.repeat(np.abs(scale.astype(np.float64)), g, axis=1)
        z = np.repeat(np.abs(zero.astype(np.float64)), g, axis=1)
        mag_stored = s * (q + z)
        mag = np.empty_like(mag_stored)
        mag[:, pm] = mag_stored  # stored column j is weight column perm[j]
        mag = torch.from_numpy(mag)
    p.validate()
    return p, mag


# (out, in, group): in not a multiple of 8/16/32/64, one output row, G = in, G tiny,
# G not a multiple of 8 or 5, groups straddling ternary bytes, in > one 1280-column tile.
SHAPES = [
    (1, 1, 1),
    (1, 7, 7),
    (3, 13, 13),
    (5, 20, 4),
    (9, 30, 3),
    (4, 100, 5),
    (6, 100, 100),
    (7, 129, 129),
    (17, 96, 32),
    (5, 576, 64),
    (13, 576, 192),
    (2, 250, 25),
    (11, 200, 8),
    (9, 1000, 40),
    (6, 1283, 1283),
    (10, 2600, 104),
]
BATCHES = [1, 7, 33]


def _run_all(fmt: str, rng: np.random.Generator, bits: int = 0, perm: bool = False) -> None:
    for o, i, g in SHAPES:
        p, mag = random_layer(fmt, o, i, g, rng, bits, perm)
        for m in BATCHES:
            x = torch.from_numpy(rng.standard_normal((m, i)).astype(np.float32))
            _check(kernels.packed_matmul(x, p, threads=2), x, p, mag)


@pytest.mark.parametrize("fmt", ["sign", "ternary"])
def test_random_codes_sign_ternary(isa, fmt):
    _run_all(fmt, np.random.default_rng([len(isa), len(fmt)]))


@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_random_codes_grid(isa, bits, perm):
    _run_all("grid", np.random.default_rng(1000 * bits + perm), bits, perm)


def test_every_byte_value(isa):
    """Each packed byte / code value appears, so every table entry and shift is exercised."""
    rng = np.random.default_rng(7)
    i = 2048
    allbytes = np.stack([rng.permutation(256) for _ in range(3)]).astype(np.uint8)  # [3, 256] bytes
    bits = np.unpackbits(allbytes, axis=1, bitorder="little").reshape(3, i)
    sign = PackedLinear(
        "t", "sign", (3, i), {"bits": pack_rows(bits, 1), "scale": _f16(rng.uniform(0.5, 1, (3, 32)))}, {"group": 64}
    )
    digits = (np.arange(243)[:, None] // np.array([1, 3, 9, 27, 81])) % 3  # all 243 trit bytes
    trits = np.stack([digits[rng.permutation(243)].reshape(-1) for _ in range(3)])
    tern = PackedLinear(
        "t",
        "ternary",
        (3, 1215),
        {"trits": pack_trits(trits), "scale": _f16(rng.uniform(0.5, 1, (3, 5)))},
        {"group": 243},
    )
    assert np.array_equal(np.sort(tern.tensors["trits"][0]), np.arange(243))
    for layer in (sign, tern):
        layer.validate()
        for m in (1, 5):
            x = torch.randn(m, layer.shape[1])
            _check(kernels.packed_matmul(x, layer), x, layer)
    for k in (1, 2, 3, 4, 8):
        q = np.stack([rng.permutation(np.arange(512) % (1 << k)) for _ in range(4)])
        p = PackedLinear(
            "t",
            "grid",
            (4, 512),
            {
                "codes": pack_rows(q, k),
                "scale": _f16(rng.uniform(0.5, 1, (4, 8))),
                "zero": _f16(np.full((4, 8), ((1 << k) - 1) / 2)),
            },
            {"bits": k, "group": 64},
        )
        for m in (1, 5):
            x = torch.randn(m, 512)
            _check(kernels.packed_matmul(x, p), x, p)


QUANTIZERS = [
    BinaryQuantizer(),
    BinaryQuantizer(32),
    BinaryQuantizer(64),
    BinaryQuantizer(8),
    TernaryQuantizer(),
    TernaryQuantizer(64),
    TernaryQuantizer(12),
    RTNQuantizer(1, 64),
    RTNQuantizer(2, 64),
    RTNQuantizer(3, 32),
    RTNQuantizer(4, 192),
    RTNQuantizer(8, 96),
    RTNQuantizer(2, 12),
    RTNQuantizer(4, 576),
]


@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: q.spec)
def test_quantized_layers(isa, q):
    """Layers from the real quantizers, including large weights and large activations."""
    gen = torch.Generator().manual_seed(3)
    for o, i in [(1, 576), (37, 576), (24, 1152)]:
        w = torch.randn(o, i, generator=gen) * 0.02
        w[:, ::97] *= 50  # outlier columns
        p = q.quantize(w)
        for m, big in [(1, 1.0), (7, 1.0), (33, 1000.0)]:
            x = torch.randn(m, i, generator=gen) * big
            _check(kernels.packed_matmul(x, p), x, p)


def test_perm_int32_and_gptq_like(isa):
    rng = np.random.default_rng(11)
    p, mag = random_layer("grid", 8, 40000, 400, rng, 2, perm=True)  # > int16 range -> int32 perm
    p.tensors["perm"] = p.tensors["perm"].astype(np.int32)
    x = torch.randn(2, 40000)
    _check(kernels.packed_matmul(x, p), x, p, mag)
    _check(kernels.packed_matmul(x[:1], p), x[:1], p, mag)


def test_threads_batch_shapes_and_determinism():
    rng = np.random.default_rng(5)
    p, mag = random_layer("grid", 45, 576, 64, rng, 4, perm=True)
    x = torch.randn(2, 3, 576)
    ref = kernels.packed_matmul(x, p, threads=1)
    assert ref.shape == (2, 3, 45)
    _check(ref, x, p, mag)
    for t in (2, 3, 5, 64):
        assert torch.equal(kernels.packed_matmul(x, p, threads=t), ref)  # rows never depend on the split
    xt = torch.randn(576, 4).T  # non-contiguous input
    assert torch.equal(kernels.packed_matmul(xt, p), kernels.packed_matmul(xt.contiguous(), p))
    assert kernels.packed_matmul(torch.empty(0, 576), p).shape == (0, 45)
    v = torch.randn(576)  # 1-D input
    assert kernels.packed_matmul(v, p).shape == (45,)


def test_prepare_cache_and_errors():
    gen = torch.Generator().manual_seed(0)
    p = RTNQuantizer(2, 64).quantize(torch.randn(16, 128, generator=gen))
    a = kernels.prepare(p)
    assert kernels.prepare(p) is a
    assert kernels.packed_matmul(torch.randn(1, 128), a).shape == (1, 16)  # prepared layers are accepted too
    p.tensors["scale"] = p.tensors["scale"] * np.float16(2)
    assert kernels.prepare(p) is not a  # replaced tensor -> rebuilt
    with pytest.raises(ValueError):
        kernels.packed_matmul(torch.randn(1, 127), p)
    with pytest.raises(TypeError):
        kernels.packed_matmul(torch.randn(1, 128, dtype=torch.float64), p)
    with pytest.raises(ValueError):
        kernels.packed_matmul(torch.randn(1, 128), p, threads=0)
    bad = PackedLinear("t", "grid", (16, 128), dict(p.tensors), {"bits": 2, "group": 64})
    bad.tensors["codes"] = bad.tensors["codes"][:, :-1]
    with pytest.raises(SalomiError):
        kernels.packed_matmul(torch.randn(1, 128), bad)
    bad2 = PackedLinear("t", "grid", (16, 128), dict(p.tensors), {"bits": 2, "group": 48})
    with pytest.raises(SalomiError):
        kernels.prepare(bad2)
    with pytest.raises(SalomiError):
        kernels.prepare(PackedLinear("t", "nosuch", (1, 1), {}, {"group": 1}))
    with pytest.raises(ValueError):
        kernels.set_isa("sse9")


def test_env_var_selects_isa():
    env = dict(os.environ, SALOMI_ISA="scalar")
    code = "from salomi.runtime import kernels; print(kernels.isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_extension_is_a_python_module():
    import salomi._kernels  # noqa: F401  (valid extension module; kernels are called via ctypes)


def test_c_driver_under_address_and_ub_sanitizers():
    """bench/sanitize.sh kernels: kernels.c + a C test driver built with ASan/UBSan, random
    shapes on every ISA against a double-precision reference written in C."""
    assert shutil.which("gcc"), "gcc is needed to build the sanitizer driver"
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "sanitize.sh"), "kernels", "150", "42"], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK:" in r.stdout and "0 failures" in r.stdout


@pytest.mark.parametrize("n,streams,threads", [(1_000_003, 1, 1), (1_000_003, 3, 2), (4096, 8, 3), (63, 1, 1), (200_000, 8, 2)])
def test_read_probe_reads_what_it_says(isa, n, streams, threads):
    """The benchmark's read-bandwidth probe reads exactly read_stream_bytes bytes: its xor equals
    numpy's over that prefix (a probe that skipped lines would report a bandwidth it never read)."""
    b = np.random.default_rng(n + streams).integers(0, 256, size=n, dtype=np.uint8)
    m = kernels.read_stream_bytes(n, streams, threads)
    assert m % 64 == 0 and n - m < 64 * streams * threads
    want = int(np.bitwise_xor.reduce(b[:m].view(np.uint64))) if m else 0
    assert kernels.read_stream(b, streams, threads) == want
    with pytest.raises(ValueError):
        kernels.read_stream(b.view(np.int8), streams, threads)
