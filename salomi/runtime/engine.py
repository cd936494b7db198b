"""Native forward pass for Llama-family packed files (salomi/runtime/csrc/engine.c).

The whole decoder runs in C: Python is called once per token (or once per prompt),
not per op. Weights are never copied: the engine gets pointers into the file's arrays
(memory-mapped) and this object keeps them alive. Every buffer is checked here against
the architecture before a pointer is handed over, and again in C.

    eng = Engine.from_file("model.salomi", max_seq=2048)
    logits = eng.logits(ids)                     # [n, vocab], fresh sequence
    for tok in eng.generate(ids, max_new_tokens=64): ...

"BASE+rot" layers (W = U^T Q V, salomi/quantizers/rotation.py) rotate their input with the
randomized Hadamard V (once per group of layers sharing it: q/k/v, gate/up), run the base
kernel, and apply U^T to the output; signs and blocks are rebuilt here from rot_seed.

activations="int8" runs ternary / 2-bit grid layers, sign layers with a group below the row
(and their +rot forms) and 4- / 8-bit grid layers (e.g. an `--embed rtn:4:g64` or `rtn:8` head,
tied or not) with the int8-activation kernels of lut.c (error bound in kernels.h); vq layers with
k <= 256 and sign layers with one scale per row run int8 lookup tables (engine.c / engine.h: one
scale per block of 32 vector columns, 8 for k >= 128, 128 columns for sign; |error| <= scale/2 per
lookup; codes re-laid 32 rows side by side: +1 byte per vq vector, +1 bit per sign weight in
memory); the KV cache defaults to IEEE half (kv="float16"). Not the default: the float engine is
the exact reference the dequant path is checked against; the int8 cost per file is measured
in docs/RESULTS.md (+0.2-0.6% ppl on the 1- and 1.5-bit files there).

With SALOMI_ENGINE_PROFILE=1 (wall time) or =cpu (calling thread's CPU time) set before
the engine is created, eng.profile() returns seconds per stage (embed, norms, qkv, ...).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from salomi.errors import SalomiError
from salomi.packing.bits import row_bytes
from salomi.packing.model_file import QuantizedFile, load_quantized
from salomi.quantizers.base import PackedLinear

# Architectures whose decoder is exactly the Llama math the engine implements.
ENGINE_ARCHS = ("llama", "mistral")
ENGINE_FORMATS = ("sign", "ternary", "grid", "vq")
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROFILE_STAGES = ("embed", "norms", "qkv", "attention", "o_proj", "gate_up", "act", "down", "head", "calls", "rot")
PROFILE_NESTED = ("calls", "rot")  # not stages of their own: a count, and time inside the projection stages

ROT = "+rot"  # composite "BASE+rot": W = U^T BASE V (salomi/quantizers/rotation.py)
LOWRANK = "+lowrank"  # composite "BASE+lowrank": W = BASE + U V, int8 factors (salomi/quantizers/lowrank.py)


def base_format(fmt: str) -> str:
    """The kernel format under the composites the engine runs: BASE[+lowrank][+rot][+lowrank]."""
    return fmt.removesuffix(LOWRANK).removesuffix(ROT).removesuffix(LOWRANK)
W_F32, W_F16, W_SIGN, W_TERNARY, W_GRID, W_VQ = range(6)
_KIND = {"sign": W_SIGN, "ternary": W_TERNARY, "grid": W_GRID, "vq": W_VQ}


class _Weight(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32), ("bits", ctypes.c_int32),
        ("out", ctypes.c_int64), ("in_", ctypes.c_int64),
        ("group", ctypes.c_int64), ("vq_d", ctypes.c_int64), ("vq_k", ctypes.c_int64),
        ("data", ctypes.c_void_p), ("data_bytes", ctypes.c_int64),
        ("scale", ctypes.c_void_p), ("scale_len", ctypes.c_int64),
        ("zero", ctypes.c_void_p), ("perm", ctypes.c_void_p), ("codebook", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("rot", ctypes.c_int32), ("rot_nb_in", ctypes.c_int32), ("rot_nb_out", ctypes.c_int32),
        ("rot_f_in", ctypes.c_int32 * 8), ("rot_f_out", ctypes.c_int32 * 8),
        ("rot_s_in", ctypes.c_void_p), ("rot_s_out", ctypes.c_void_p),
        ("rot_m_in", ctypes.c_void_p), ("rot_m_out", ctypes.c_void_p),
        ("act_i8", ctypes.c_int32),
        ("lr_rank", ctypes.c_int32), ("lr_rot_inside", ctypes.c_int32),
        ("lr_u", ctypes.c_void_p), ("lr_v", ctypes.c_void_p), ("lr_us", ctypes.c_void_p), ("lr_vs", ctypes.c_void_p),
    ]


class _Config(ctypes.Structure):
    _fields_ = [
        ("n_layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("n_heads", ctypes.c_int32),
        ("n_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("intermediate", ctypes.c_int32),
        ("vocab", ctypes.c_int32), ("max_seq", ctypes.c_int32), ("threads", ctypes.c_int32),
        ("rms_eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("rope_factor", ctypes.c_float),
        ("inv_freq", ctypes.c_void_p), ("kv_f16", ctypes.c_int32),
    ]


_lib: ctypes.CDLL | None = None


def _load_lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        from salomi.runtime import kernels

        lib = kernels._load()
        vp, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.salomi_engine_create.argtypes = [ctypes.POINTER(_Config), ctypes.POINTER(_Weight), vp,
                                             ctypes.c_char_p, cint]
        lib.salomi_engine_create.restype = vp
        lib.salomi_engine_free.argtypes = [vp]
        lib.salomi_engine_free.restype = None
        lib.salomi_engine_reset.argtypes = [vp]
        lib.salomi_engine_reset.restype = None
        lib.salomi_engine_forward.argtypes = [vp, vp, i64, i64, vp, cint]
        lib.salomi_engine_forward.restype = cint
        lib.salomi_engine_length.argtypes = [vp]
        lib.salomi_engine_length.restype = i64
        lib.salomi_engine_error.argtypes = [vp]
        lib.salomi_engine_error.restype = ctypes.c_char_p
        lib.salomi_engine_profile.argtypes = [vp, ctypes.POINTER(ctypes.c_double), cint]
        lib.salomi_engine_profile.restype = cint
        _lib = lib
    return _lib


def _unsupported(why: str) -> SalomiError:
    return SalomiError(f"the native engine cannot run this file ({why}); use --runtime kernels or dequant")


@dataclass
class Arch:
    """The numbers the engine needs, read straight from the file's config dict (building
    a transformers config object would import ~60 MB of modules for nothing)."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    rms_eps: float
    tied: bool
    rope_type: str
    rope: dict[str, Any]


def _rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 keeps rope settings in rope_parameters; older configs use
    rope_theta + rope_scaling."""
    rp = dict(config.get("rope_parameters") or {})
    if not rp:
        rp = dict(config.get("rope_scaling") or {})
        rp.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rp["rope_type"] = rp.get("rope_type") or rp.get("type") or "default"
    return rp


def check_config(config: dict[str, Any]) -> Arch:
    """The architecture if the engine implements it exactly, else a one-line SalomiError."""
    model_type = config.get("model_type")
    if model_type not in ENGINE_ARCHS:
        raise _unsupported(f"architecture {model_type!r}; the engine runs {', '.join(ENGINE_ARCHS)}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(f"activation {act!r}; the engine implements silu")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        arch = Arch(
            model_type=model_type, layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            max_positions=int(config.get("max_position_embeddings") or 2048),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)), tied=bool(config.get("tie_word_embeddings", False)),
            rope_type="", rope=_rope_params(config),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SalomiError(f"the file's model config is incomplete or corrupt ({e!r})") from None
    arch.rope_type = str(arch.rope["rope_type"])
    window = config.get("sliding_window")
    if model_type == "mistral" and window is not None and int(window) < arch.max_positions:
        raise _unsupported(f"sliding-window attention ({window})")
    if arch.rope_type not in ("default", "linear", "llama3"):  # the others change with the sequence length
        raise _unsupported(f"rope type {arch.rope_type!r}")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported("partial rotary embedding")
    return arch


def rope_inv_freq(arch: Arch, config: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Inverse frequencies and cos/sin scaling exactly as the HF rotary embedding makes them."""
    if arch.rope_type == "default":  # the same float32 torch arithmetic as HF's default rope
        base, dim = float(arch.rope["rope_theta"]), arch.head_dim
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        return np.ascontiguousarray(inv.numpy(), dtype=np.float32), 1.0
    from transformers import AutoConfig  # scaled ropes: defer to HF's own init functions
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = dict(config)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    inv, scaling = ROPE_INIT_FUNCTIONS[arch.rope_type](hf, None)
    return np.ascontiguousarray(inv.float().numpy()), float(scaling)


def unsupported_reason(qf: QuantizedFile) -> str | None:
    """None when Engine.from_file will accept the file, else why not (for runtime "auto")."""
    try:
        check_config(qf.metadata["config"])
    except SalomiError as e:
        return str(e)
    for name, p in {**qf.packed, **qf.embeddings}.items():
        base = base_format(p.format)
        if base not in ENGINE_FORMATS or (base != p.format and name == "model.embed_tokens"):
            return f"layer {name} has storage format {p.format!r}"
    return None


def _f16_or_f32(a: np.ndarray, name: str, shape: tuple[int, int]) -> tuple[int, np.ndarray]:
    if tuple(a.shape) != shape:
        raise SalomiError(f"tensor {name} has shape {list(a.shape)}, the config needs {list(shape)} (corrupt file?)")
    if a.dtype == np.float16:
        return W_F16, np.ascontiguousarray(a).view(np.uint16)
    if a.dtype == np.float32:
        return W_F32, np.ascontiguousarray(a)
    raise _unsupported(f"tensor {name} is stored as {a.dtype}")


def _f32_vector(a: np.ndarray, name: str, n: int) -> np.ndarray:
    if a.ndim != 1 or a.shape[0] != n:
        raise SalomiError(f"tensor {name} has shape {list(a.shape)}, expected [{n}] (corrupt file?)")
    return np.ascontiguousarray(a, dtype=np.float32)  # copies only if stored narrower (tiny)


def _expect(p: PackedLinear, t: str, dtype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    a = p.tensors.get(t)
    if a is None or a.dtype != np.dtype(dtype) or tuple(a.shape) != shape:
        got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
        raise SalomiError(f"{name}: packed tensor {t!r} is {got}, expected {dtype}{list(shape)} (corrupt file?)")
    return np.ascontiguousarray(a)


class Engine:
    """A loaded native decoder with its KV cache. Not thread safe; one sequence at a time."""

    def __init__(self, qf: QuantizedFile, max_seq: int | None = None, threads: int = 2,
                 activations: str = "float", kv: str | None = None) -> None:
        if activations not in ("float", "int8"):
            raise SalomiError(f"activations must be 'float' or 'int8' (got {activations!r})")
        kv = kv or ("float16" if activations == "int8" else "float32")
        if kv not in ("float32", "float16"):
            raise SalomiError(f"kv must be 'float32' or 'float16' (got {kv!r})")
        self.activations = activations
        self.kv = kv
        self.int8_layers = 0
        arch = check_config(qf.metadata["config"])
        self.qf = qf
        self.arch = arch
        self._keep: list[Any] = []  # every array the C side points into
        self._rot: dict[tuple[int, int], tuple[tuple[int, ...], np.ndarray, np.ndarray]] = {}
        L, H, nh, nkv, hd = arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim
        inter, vocab = arch.intermediate, arch.vocab
        self.max_seq = min(arch.max_positions, int(max_seq)) if max_seq else arch.max_positions
        if self.max_seq < 1:
            raise SalomiError(f"max_seq must be >= 1 (got {max_seq})")
        self.vocab = vocab
        self.threads = max(1, int(threads))
        inv_freq, rope_factor = rope_inv_freq(arch, qf.metadata["config"])
        if inv_freq.shape != (hd // 2,):
            raise _unsupported(f"rotary dimension {inv_freq.shape[0] * 2} != head_dim {hd}")
        self._keep.append(inv_freq)

        weights = (_Weight * (7 * L + 2))()
        weights[0] = self._weight("model.embed_tokens", vocab, H)
        for layer in range(L):
            outs = (nh * hd, nkv * hd, nkv * hd, H, inter, inter, H)
            ins = (H, H, H, nh * hd, H, H, inter)
            for j, proj in enumerate(PROJ):
                weights[1 + 7 * layer + j] = self._weight(f"model.layers.{layer}.{proj}", outs[j], ins[j])
        if "lm_head" in qf.packed or "lm_head" in qf.embeddings or "lm_head.weight" in qf.floats or not arch.tied:
            weights[7 * L + 1] = self._weight("lm_head", vocab, H)
        else:
            weights[7 * L + 1] = weights[0]  # tied: the same bytes, read as a matrix
            from salomi.runtime import kernels

            emb = qf.embeddings.get("model.embed_tokens")
            if (self.activations == "int8" and emb is not None and emb.format in kernels.KERNEL_FORMATS
                    and kernels.int8_supported(emb)):
                weights[7 * L + 1].act_i8 = 1  # the head GEMV may run int8; the row lookup never does
                self.int8_layers += 1
        norm_names = [f"model.layers.{i}.{n}.weight" for i in range(L)
                      for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"]
        norms = (ctypes.c_void_p * len(norm_names))()
        for i, n in enumerate(norm_names):
            if n not in qf.floats:
                raise SalomiError(f"{qf.path}: missing tensor {n} (corrupt or incomplete file)")
            a = _f32_vector(qf.floats[n], n, H)
            self._keep.append(a)
            norms[i] = a.ctypes.data
        self._keep += [weights, norms]

        cfg = _Config(L, H, nh, nkv, hd, inter, vocab, self.max_seq, self.threads, arch.rms_eps, float(hd) ** -0.5,
                      rope_factor, inv_freq.ctypes.data, int(kv == "float16"))
        self._cfg = cfg
        lib = _load_lib()
        err = ctypes.create_string_buffer(512)
        handle = lib.salomi_engine_create(ctypes.byref(cfg), weights, norms, err, len(err))
        if not handle:
            raise SalomiError(f"{qf.path}: engine rejected the file: {err.value.decode(errors='replace')}")
        self._h: int | None = handle
        self._lib = lib

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_file(cls, qf_or_path: QuantizedFile | str | Path, max_seq: int | None = 4096,
                  threads: int = 2, activations: str = "float", kv: str | None = None) -> Engine:
        """activations="int8": layers with an int8 kernel (sign, ternary, 2/4/8-bit grid with a
        supported group, vq with k <= 256, and their +rot forms) quantize their input rows (or
        lookup tables) to int8 (kernels.h / engine.h give the error bounds); the rest stay float.
        kv: KV cache "float32" (exact) or "float16" (half the attention bytes); default float16
        with activations="int8", float32 otherwise."""
        qf = qf_or_path if isinstance(qf_or_path, QuantizedFile) else load_quantized(qf_or_path)
        return cls(qf, max_seq=max_seq, threads=threads, activations=activations, kv=kv)

    def _bias(self, name: str, out: int) -> int | None:
        b = self.qf.floats.get(f"{name}.bias")
        if b is None:
            return None
        a = _f32_vector(b, f"{name}.bias", out)
        self._keep.append(a)
        return int(a.ctypes.data)

    def _weight(self, name: str, out: int, inp: int) -> _Weight:
        w = _Weight()
        w.out, w.in_ = out, inp
        p = self.qf.packed.get(name) or self.qf.embeddings.get(name)  # embeddings: `salomi quantize --embed`
        if p is None:
            key = f"{name}.weight"
            if key not in self.qf.floats:
                raise SalomiError(f"{self.qf.path}: missing tensor {key} (corrupt or incomplete file)")
            w.kind, a = _f16_or_f32(self.qf.floats[key], key, (out, inp))
            w.data, w.data_bytes = a.ctypes.data, a.nbytes
            self._keep.append(a)
        else:
            self._packed(w, name, p, out, inp)
        w.bias = self._bias(name, out)
        return w

    def _rotation(self, n: int, seed: int, f_out: Any) -> tuple[int, int, int]:
        """Block orders (written into f_out), sign and block pointers of the transform of
        order n from seed; one copy per (n, seed) so layers sharing it share pointers."""
        key = (n, seed)
        if key not in self._rot:
            from salomi.quantizers.rotation import _mats, _signs, factors

            f = factors(n)  # one-line SalomiError for unsupported orders
            if len(f) > 8 or max(f) > 64:
                raise _unsupported(f"+rot of order {n}")
            s = np.ascontiguousarray(_signs(n, seed).numpy(), dtype=np.float32)
            m = np.ascontiguousarray(np.concatenate([t.numpy().reshape(-1) for t in _mats(n)]), dtype=np.float32)
            self._rot[key] = (f, s, m)
            self._keep += [s, m]
        f, s, m = self._rot[key]
        for i, v in enumerate(f):
            f_out[i] = v
        return len(f), int(s.ctypes.data), int(m.ctypes.data)

    def _lowrank(self, w: _Weight, name: str, p: PackedLinear, out: int, inp: int, inside: bool) -> PackedLinear:
        """Point w's lr_* fields at the int8 factors of a "+lowrank" layer; returns its base part."""
        from salomi.quantizers.lowrank import split_lowrank

        if w.lr_rank:
            raise _unsupported(f"layer {name} has two low-rank parts ({p.format!r})")
        u = p.tensors.get("lowrank.u")
        r = int(u.shape[1]) if u is not None and u.ndim == 2 else 0
        arrays = [_expect(p, "lowrank.u", "int8", (out, r), name), _expect(p, "lowrank.v", "int8", (r, inp), name),
                  _expect(p, "lowrank.u_scale", "float16", (out,), name).view(np.uint16),
                  _expect(p, "lowrank.v_scale", "float16", (r,), name).view(np.uint16)]
        w.lr_rank, w.lr_rot_inside = r, int(inside)
        w.lr_u, w.lr_v, w.lr_us, w.lr_vs = (int(a.ctypes.data) for a in arrays)
        self._keep += arrays
        return split_lowrank(p)[0]

    def _packed(self, w: _Weight, name: str, p: PackedLinear, out: int, inp: int) -> None:
        if tuple(int(v) for v in p.shape) != (out, inp):
            raise SalomiError(f"{name}: packed shape {list(p.shape)}, the config needs {[out, inp]} (corrupt file?)")
        if base_format(p.format) != p.format and name == "model.embed_tokens":
            raise _unsupported(f"layer {name} has storage format {p.format!r}")
        if p.format.endswith(LOWRANK):  # outside any rotation: added to the layer's output
            p = self._lowrank(w, name, p, out, inp, inside=False)
        if p.format.endswith(ROT):
            from salomi.quantizers.rotation import rot_seed, split_rot

            seed = rot_seed(p, name)
            w.rot = 1
            w.rot_nb_in, w.rot_s_in, w.rot_m_in = self._rotation(inp, seed, w.rot_f_in)
            w.rot_nb_out, w.rot_s_out, w.rot_m_out = self._rotation(out, seed + 1, w.rot_f_out)
            p = split_rot(p)
            if p.format.endswith(LOWRANK):
                p = self._lowrank(w, name, p, out, inp, inside=True)
        if p.format not in _KIND:
            raise _unsupported(f"layer {name} has storage format {p.format!r}")
        w.kind = _KIND[p.format]
        arrays: list[np.ndarray] = []
        if p.format == "vq":
            d, k = int(p.params["d"]), int(p.params["k"])
            if d < 1 or inp % d or not 2 <= k <= 65536:
                raise SalomiError(f"{name}: vq layer has bad parameters d={d}, k={k}")
            from salomi.quantizers.vq import code_bits

            b = code_bits(k)
            codes = _expect(p, "codes", "uint8", (out, row_bytes(inp // d, b)), name)
            cb = _expect(p, "codebook", "float16", (k, d), name).view(np.uint16)
            scale = _expect(p, "scale", "float16", (out,), name).view(np.uint16)
            w.bits, w.vq_d, w.vq_k = b, d, k
            w.codebook = cb.ctypes.data
            if self.activations == "int8" and name != "model.embed_tokens" and k <= 256:
                w.act_i8 = 1  # int8 lookup tables, 32 rows per vpshufb (engine.c)
                self.int8_layers += 1
            arrays += [codes, cb, scale]
        else:
            from salomi.runtime import kernels

            prep = kernels.prepare(p)  # checks dtypes/shapes of the kernel formats
            if self.activations == "int8" and name != "model.embed_tokens" and kernels.int8_supported(prep):
                w.act_i8 = 1
                self.int8_layers += 1
            codes, scale = prep.data, prep.scale
            w.group, w.bits = prep.group, prep.bits
            if prep.zero is not None:
                w.zero = prep.zero.ctypes.data
                arrays.append(prep.zero)
            if prep.perm is not None:
                w.perm = prep.perm.ctypes.data
                arrays.append(prep.perm)
            arrays += [codes, scale]
        w.data, w.data_bytes = codes.ctypes.data, codes.nbytes
        w.scale, w.scale_len = scale.ctypes.data, scale.size
        self._keep += arrays

    # ------------------------------------------------------------------ running

    def close(self) -> None:
        if getattr(self, "_h", None):
            self._lib.salomi_engine_free(self._h)
            self._h = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def length(self) -> int:
        """Positions held in the KV cache."""
        return int(self._lib.salomi_engine_length(self._handle()))

    def _handle(self) -> int:
        if not self._h:
            raise SalomiError("the engine was closed")
        return self._h

    def reset(self) -> None:
        self._lib.salomi_engine_reset(self._handle())

    def forward(self, tokens: Sequence[int] | torch.Tensor | np.ndarray, pos: int | None = None,
                all_positions: bool = False) -> torch.Tensor:
        """Run tokens at positions pos.. (default: after the cached ones); returns float32
        logits [vocab] for the last token, or [n, vocab] with all_positions."""
        ids = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(-1))
        n = ids.size
        if n == 0:
            raise SalomiError("no tokens to run")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise SalomiError(f"token id {int(ids.max())} is outside the vocabulary of {self.vocab}")
        ids32 = ids.astype(np.int32)
        start = self.length if pos is None else int(pos)
        out = torch.empty((n, self.vocab) if all_positions else (self.vocab,), dtype=torch.float32)
        rc = self._lib.salomi_engine_forward(self._handle(), ids32.ctypes.data, n, start, out.data_ptr(),
                                             int(all_positions))
        if rc != 0:
            raise SalomiError(f"engine forward failed: {self._lib.salomi_engine_error(self._h).decode()}")
        return out

    def logits(self, tokens: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits [n, vocab] of a fresh sequence (the cache is reset first)."""
        self.reset()
        return self.forward(tokens, pos=0, all_positions=True)

    def generate(self, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0, eos: int | None = None) -> Iterator[int]:
        """Yield new token ids (greedy, or sampled with temperature > 0); stops at eos."""
        gen = torch.Generator().manual_seed(seed)
        self.reset()
        logits = self.forward(prompt, pos=0)
        for i in range(max_new_tokens):
            if temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            else:
                nxt = int(np.argmax(logits.numpy()))  # torch's argmax costs ~75 us per token here, numpy ~5
            if nxt == eos:
                return
            yield nxt
            if i + 1 < max_new_tokens:
                logits = self.forward([nxt])

    def profile(self) -> dict[str, float]:
        """Seconds per stage since create (needs SALOMI_ENGINE_PROFILE=1 at create)."""
        buf = (ctypes.c_double * len(PROFILE_STAGES))()
        k = self._lib.salomi_engine_profile(self._handle(), buf, len(buf))
        return {PROFILE_STAGES[i]: buf[i] for i in range(k)}

    def as_module(self) -> nn.Module:
        return EngineModule(self)


class EngineModule(nn.Module):
    """Looks enough like a HF causal LM for salomi.evaluation (model(ids).logits)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_: Any) -> SimpleNamespace:
        if input_ids.dim() != 2:
            raise SalomiError("the engine takes input ids of shape [batch, seq]")
        rows = [self.engine.logits(row.cpu()) for row in input_ids]
        return SimpleNamespace(logits=torch.stack(rows))
