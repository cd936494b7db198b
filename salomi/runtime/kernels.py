"""Fast y = x @ W^T straight from packed layers ("sign", "ternary", "grid" formats).

The C kernels (salomi/runtime/csrc/kernels.c) are built by setup.py as the extension
module `salomi._kernels`; this module loads that file with ctypes and calls plain C
functions, so there is no Python C-API glue. The weight is never materialised in float:
the kernels decode the packed bytes in registers (GEMV) or one small tile at a time
(GEMM, several activation rows).

Public API:
    available() -> bool                 the compiled extension could be loaded
    isa() -> str                        ISA in use: "avx512", "avx2" or "scalar"
    cpu_isa() -> str                    best ISA this CPU supports
    set_isa(name) -> None               force "avx512" | "avx2" | "scalar", or "auto"
    prepare(p) -> PreparedLayer         validate + cache the C-ready view of a PackedLinear
    packed_matmul(x, p, threads=2, activations="float")
                                        x [..., in] float32 CPU -> [..., out] float32
    int8_supported(p) -> bool           an int8-activation kernel exists for this layer
    tables(p) -> Tables                 re-lay a per-row-scale sign or ternary layer for the T-MAC
                                        int8 table kernel
    tables_matmul(x, t, threads)        its GEMV (the engine's path for such layers under int8)

activations="int8" (sign, ternary, grid with 2 bits and group 16/32/64/128 or a
multiple of 128, grid with 4 bits (rows a multiple of 64) or 8 bits and a group multiple
of 32) quantizes each activation row to int8 per weight scale group (absmax / 127, round
half to even) and runs integer kernels (csrc/lut.c): 1.6-2.8x faster GEMV,
but not bit-exact with the float kernels; per output
|y - y_float| <= sum_g |s_g| * (max_{j in g} |x_j| / 254) * sum_{j in g} |q_j - z_g|
plus float rounding (measured: 0.4-1% relative error for Gaussian activations, see
tests/test_kernels_lut.py). The default stays "float": it is the exact reference the
rest of the project (perplexity, generation tests) is checked against; the end-to-end
cost of int8 is measured per file in docs/RESULTS.md (salomi eval --activations int8).
The environment variable SALOMI_ISA=avx512|avx2|scalar selects the default ISA (a
request above what the CPU supports falls back to the best available one).
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from salomi.errors import SalomiError
from salomi.packing.bits import row_bytes
from salomi.quantizers.base import PackedLinear

_ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}
_ISA_IDS = {v: k for k, v in _ISA_NAMES.items()}

_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def _load() -> ctypes.CDLL:
    global _lib, _load_error
    if _lib is not None:
        return _lib
    if _load_error is not None:
        raise SalomiError(_load_error)
    try:
        spec = importlib.util.find_spec("salomi._kernels")
        if spec is None or not spec.origin:
            raise OSError("extension module salomi._kernels not found")
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        _load_error = (
            f"salomi C kernels are not available ({e}); build them with `pip install -e .` "
            f"(needs a C compiler) from the repository root"
        )
        raise SalomiError(_load_error) from None
    c_f, c_u8, c_u16, c_i32 = (ctypes.c_void_p,) * 4
    i64, cint = ctypes.c_int64, ctypes.c_int
    lib.salomi_cpu_isa.restype = cint
    lib.salomi_get_isa.restype = cint
    lib.salomi_set_isa.argtypes = [cint]
    lib.salomi_set_isa.restype = cint
    lib.salomi_sign_matmul.argtypes = [c_f, i64, i64, i64, c_u8, c_u16, i64, c_f, cint]
    lib.salomi_sign_matmul.restype = cint
    lib.salomi_ternary_matmul.argtypes = [c_f, i64, i64, i64, c_u8, c_u16, i64, c_f, cint]
    lib.salomi_ternary_matmul.restype = cint
    lib.salomi_grid_matmul.argtypes = [c_f, i64, i64, i64, c_u8, cint, c_u16, c_u16, i64, c_i32, c_f, cint]
    lib.salomi_grid_matmul.restype = cint
    for name in ("salomi_sign_matmul_i8", "salomi_ternary_matmul_i8"):
        fn = getattr(lib, name)
        fn.argtypes = [c_f, i64, i64, i64, c_u8, c_u16, i64, c_f, cint]
        fn.restype = cint
    lib.salomi_grid_matmul_i8.argtypes = [c_f, i64, i64, i64, c_u8, cint, c_u16, c_u16, i64, c_i32, c_f, cint]
    lib.salomi_grid_matmul_i8.restype = cint
    lib.salomi_tables_ok.argtypes = [cint, i64, i64]
    lib.salomi_tables_ok.restype = cint
    lib.salomi_tables_bytes.argtypes = [cint, i64, i64]
    lib.salomi_tables_bytes.restype = i64
    lib.salomi_tables_layout.argtypes = [cint, c_u8, i64, i64, c_u8]
    lib.salomi_tables_layout.restype = cint
    lib.salomi_tables_matmul.argtypes = [cint, c_f, i64, i64, i64, c_u8, c_u16, c_f, cint]
    lib.salomi_tables_matmul.restype = cint
    lib.salomi_read_stream.argtypes = [c_u8, i64, cint, cint]
    lib.salomi_read_stream.restype = ctypes.c_uint64
    _lib = lib
    return lib


def available() -> bool:
    try:
        _load()
        return True
    except SalomiError:
        return False


def isa() -> str:
    return _ISA_NAMES[_load().salomi_get_isa()]


def cpu_isa() -> str:
    return _ISA_NAMES[_load().salomi_cpu_isa()]


def set_isa(name: str) -> None:
    """Force the kernels onto one ISA ("avx512", "avx2", "scalar") or back to "auto"."""
    lib = _load()
    if name == "auto":
        lib.salomi_set_isa(-1)
        return
    if name not in _ISA_IDS:
        raise ValueError(f"unknown ISA {name!r} (choose from avx512, avx2, scalar, auto)")
    if lib.salomi_set_isa(_ISA_IDS[name]) != 0:
        raise ValueError(f"this CPU cannot run the {name} kernels (best available: {cpu_isa()})")


@dataclass
class PreparedLayer:
    """C-ready view of a PackedLinear: contiguous arrays kept alive, sizes checked."""

    format: str
    out_features: int
    in_features: int
    group: int
    bits: int
    data: np.ndarray  # uint8 [out, row_bytes]
    scale: np.ndarray  # uint16 view of the fp16 scales [out, in/G]
    zero: np.ndarray | None
    perm: np.ndarray | None  # int32 [in]
    sources: tuple[Any, ...]  # the PackedLinear arrays this was made from (cache check)


def _u8(a: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    if a.dtype != np.uint8 or tuple(a.shape) != shape:
        raise SalomiError(f"packed tensor {name!r} is {a.dtype}{list(a.shape)}, expected uint8{list(shape)}")
    return np.ascontiguousarray(a)


def _f16(a: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    if a.dtype != np.float16 or tuple(a.shape) != shape:
        raise SalomiError(f"packed tensor {name!r} is {a.dtype}{list(a.shape)}, expected float16{list(shape)}")
    return np.ascontiguousarray(a).view(np.uint16)  # the kernels read the raw fp16 bits


def prepare(p: PackedLinear) -> PreparedLayer:
    """Check a packed layer against its format and cache contiguous C views on it.

    The cache lives on the PackedLinear itself (attribute `_kernel_prep`) and is rebuilt
    if any of its tensors was replaced.
    """
    names = ("bits", "trits", "codes", "scale", "zero", "perm")
    sources = tuple(p.tensors.get(n) for n in names)
    cached = getattr(p, "_kernel_prep", None)
    if isinstance(cached, PreparedLayer) and all(a is b for a, b in zip(cached.sources, sources, strict=True)):
        return cached
    o, i = (int(v) for v in p.shape)
    if o < 1 or i < 1:
        raise SalomiError(f"packed layer has an empty shape {p.shape}")
    g = int(p.params.get("group", 0))
    if g < 1 or i % g:
        raise SalomiError(f"packed layer group size {g} does not divide its {i} input features")
    ng = i // g
    zero = perm = None
    bits = 0
    if p.format == "sign":
        data = _u8(p.tensors["bits"], "bits", (o, row_bytes(i, 1)))
    elif p.format == "ternary":
        data = _u8(p.tensors["trits"], "trits", (o, (i + 4) // 5))
    elif p.format == "grid":
        bits = int(p.params["bits"])
        if not 1 <= bits <= 8:
            raise SalomiError(f"grid layer has {bits} bits per code, kernels take 1..8")
        data = _u8(p.tensors["codes"], "codes", (o, row_bytes(i, bits)))
        zero = _f16(p.tensors["zero"], "zero", (o, ng))
        if "perm" in p.tensors:
            perm = np.ascontiguousarray(np.asarray(p.tensors["perm"]).astype(np.int32))
            if perm.shape != (i,) or not np.array_equal(np.sort(perm), np.arange(i)):
                raise SalomiError("packed grid layer has an invalid column permutation (corrupt)")
    else:
        raise SalomiError(f"no kernel for storage format {p.format!r} (kernels: sign, ternary, grid)")
    scale = _f16(p.tensors["scale"], "scale", (o, ng))
    prep = PreparedLayer(p.format, o, i, g, bits, data, scale, zero, perm, sources)
    p._kernel_prep = prep  # type: ignore[attr-defined]
    return prep


_ERRORS = {-1: "invalid argument", -2: "out of memory"}


INT8_FORMATS = ("sign", "ternary", "grid")  # grid: 2, 4 or 8 bits and a supported group only (int8_supported)


def int8_supported(p: PackedLinear | PreparedLayer) -> bool:
    """True when packed_matmul(..., activations="int8") can run this layer."""
    prep = p if isinstance(p, PreparedLayer) else prepare(p)
    if prep.format in ("sign", "ternary"):
        return True
    g = prep.group
    if prep.format == "grid" and prep.bits == 8:
        return g % 32 == 0
    if prep.format == "grid" and prep.bits == 4:
        return g % 32 == 0 and prep.in_features % 64 == 0
    return prep.format == "grid" and prep.bits == 2 and g % 16 == 0 and (128 % g == 0 or g % 128 == 0)


def packed_matmul(
    x: torch.Tensor, p: PackedLinear | PreparedLayer, threads: int = 2, activations: str = "float"
) -> torch.Tensor:
    """y = x @ W^T with W = p.dequantize(), computed from the packed bytes.

    x: float32 CPU tensor [..., in] (made contiguous if it is not). Returns float32 [..., out].
    threads: worker threads over output rows (>= 1).
    activations: "float" (exact float32 kernels, the reference) or "int8" (activations
    quantized to int8 per weight group, integer kernels; layers with int8_supported(p)).
    """
    lib = _load()
    if activations not in ("float", "int8"):
        raise ValueError(f"activations must be 'float' or 'int8', not {activations!r}")
    prep = p if isinstance(p, PreparedLayer) else prepare(p)
    if activations == "int8" and not int8_supported(prep):
        raise ValueError(
            f"no int8-activation kernel for this {prep.format!r} layer (bits {prep.bits}, group {prep.group}); "
            "int8 covers sign, ternary, 2-bit grid with group 16/32/64/128 or a multiple of 128, 4-bit grid with "
            "a group that is a multiple of 32 on rows of whole 64 columns, and 8-bit grid with a group that is a "
            "multiple of 32"
        )
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError("packed_matmul expects a float32 CPU torch.Tensor")
    if x.dim() < 1 or x.shape[-1] != prep.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., {prep.in_features}]")
    threads = int(threads)
    if threads < 1:
        raise ValueError("threads must be >= 1")
    x = x.contiguous()
    lead = tuple(x.shape[:-1])
    m = x.numel() // prep.in_features
    y = torch.empty(*lead, prep.out_features, dtype=torch.float32)
    if m == 0:
        return y
    args = (x.data_ptr(), m, prep.in_features, prep.out_features, prep.data.ctypes.data)
    if activations == "int8" and prep.format != "grid":
        fn = lib.salomi_sign_matmul_i8 if prep.format == "sign" else lib.salomi_ternary_matmul_i8
        rc = fn(*args, prep.scale.ctypes.data, prep.group, y.data_ptr(), threads)
    elif prep.format == "sign":
        rc = lib.salomi_sign_matmul(*args, prep.scale.ctypes.data, prep.group, y.data_ptr(), threads)
    elif prep.format == "ternary":
        rc = lib.salomi_ternary_matmul(*args, prep.scale.ctypes.data, prep.group, y.data_ptr(), threads)
    else:
        assert prep.zero is not None
        grid_fn = lib.salomi_grid_matmul_i8 if activations == "int8" else lib.salomi_grid_matmul
        rc = grid_fn(
            *args,
            prep.bits,
            prep.scale.ctypes.data,
            prep.zero.ctypes.data,
            prep.group,
            None if prep.perm is None else prep.perm.ctypes.data,
            y.data_ptr(),
            threads,
        )
    if rc != 0:
        raise SalomiError(f"packed_matmul kernel failed: {_ERRORS.get(rc, rc)}")
    return y


KERNEL_FORMATS = ("sign", "ternary", "grid")


def supports(p: PackedLinear) -> bool:
    """True when a C kernel runs this layer's storage format straight from its bytes."""
    return p.format in KERNEL_FORMATS


TABLE_KINDS = {"sign": 2, "ternary": 3}  # engine.h: SALOMI_W_SIGN, SALOMI_W_TERNARY


@dataclass
class Tables:
    """A sign or ternary layer re-laid for the T-MAC int8 table kernel (what the engine builds
    at load for such layers with one scale per row and activations="int8"; engine.h,
    salomi_tables_*)."""

    kind: int
    out_features: int
    in_features: int
    il: np.ndarray  # uint8, 32 rows side by side
    scale: np.ndarray  # uint16 view of the fp16 row scales [out, 1]


def tables_supported(p: PackedLinear) -> bool:
    kind = TABLE_KINDS.get(p.format)
    return kind is not None and bool(_load().salomi_tables_ok(kind, int(p.shape[1]), int(p.params.get("group", 0))))


def tables(p: PackedLinear) -> Tables:
    """Re-lay a sign layer (one scale per row, in % 8 == 0) or a ternary layer (one scale per
    row) for tables_matmul; as many bits per weight as the file."""
    if not tables_supported(p):
        raise ValueError(
            f"int8 tables need a sign layer with one scale per row and in % 8 == 0, or a ternary layer with one "
            f"scale per row (got {p.format!r} {tuple(p.shape)}, group {p.params.get('group')})"
        )
    lib, prep, kind = _load(), prepare(p), TABLE_KINDS[p.format]
    il = np.empty(lib.salomi_tables_bytes(kind, prep.out_features, prep.in_features), dtype=np.uint8)
    if lib.salomi_tables_layout(kind, prep.data.ctypes.data, prep.out_features, prep.in_features, il.ctypes.data):
        raise SalomiError("int8 table layout failed")
    return Tables(kind, prep.out_features, prep.in_features, il, prep.scale)


def tables_matmul(x: torch.Tensor, t: Tables, threads: int = 2) -> torch.Tensor:
    """y = x @ W^T through int8 lookup tables (error bound in engine.h); x float32 CPU [..., in]."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError("tables_matmul expects a float32 CPU torch.Tensor")
    if x.dim() < 1 or x.shape[-1] != t.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., {t.in_features}]")
    if int(threads) < 1:
        raise ValueError("threads must be >= 1")
    x = x.contiguous()
    m = x.numel() // t.in_features
    y = torch.empty(*x.shape[:-1], t.out_features, dtype=torch.float32)
    rc = _load().salomi_tables_matmul(t.kind, x.data_ptr(), m, t.in_features, t.out_features, t.il.ctypes.data,
                                      t.scale.ctypes.data, y.data_ptr(), int(threads))
    if rc != 0:
        raise SalomiError(f"tables_matmul kernel failed: {_ERRORS.get(rc, rc)}")
    return y


def read_stream(buf: np.ndarray, streams: int = 1, threads: int = 2) -> int:
    """xor of the bytes a read-only pass over `buf` reads (the benchmark's read-bandwidth
    probe): each thread reads its slice as `streams` parts in lockstep, 64 bytes of each per
    step; what is read is the first len(buf) // threads // streams // 64 * 64 * streams * threads bytes."""
    if buf.dtype != np.uint8 or not buf.flags.c_contiguous:
        raise ValueError("buf must be a contiguous uint8 array")
    if int(streams) < 1 or int(threads) < 1:
        raise ValueError("streams and threads must be >= 1")
    return int(_load().salomi_read_stream(buf.ctypes.data, buf.size, int(streams), int(threads)))


def read_stream_bytes(n: int, streams: int = 1, threads: int = 2) -> int:
    """How many bytes read_stream reads of an n-byte buffer."""
    return n // threads // streams // 64 * 64 * streams * threads
