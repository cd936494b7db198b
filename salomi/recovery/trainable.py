"""A differentiable view of each storage format, and its way back to the same packed layout.

Every value a format stores in continuous form (fp16 scales, zero points, VQ codebooks,
low-rank scales, PB-LLM salient values) becomes a `Cont`: value = base + mag * delta,
with `base` the stored value (fp16-exact), `mag` a fixed per-element magnitude (|base|
for scales, so one learning rate means "relative change" everywhere) and `delta` the
trainable parameter, starting at 0. `snap_()` rounds the value to what the file can
hold (fp16) and folds it back into `base`, so a trained view and the packed layer it
repacks to compute the same weight.

Discrete codes are fixed unless `train_codes=True`: then a latent float per code (in
code units, starting at the stored code) is rounded in the forward pass and passes the
gradient straight through (STE); at repack the codes are re-derived by the same rounding.

What is trainable, per format:
    grid      scale (relative), zero (code units); codes by STE
    sign      scale (relative); signs by STE
    ternary   scale (relative); trits by STE
    vq        codebook (in units of its RMS), row scale (relative); with code_flip > 0, codes by STE
              through a latent vector per code, moved to the centroid nearest it between steps (a
              capped share per step: VQView.update_codes)
    billm     the four row scales (relative); both bit planes and the salient-column mask frozen
    pbllm     row scale of the binary part and the int8 row scale (or the fp16 salient
              values) (relative); signs, salient positions and int8 codes frozen
    X+lowrank X as above, plus lowrank.u_scale and lowrank.v_scale (relative); the int8 u, v by STE
    X+rot     X as above, in the rotated basis (the fixed Hadamard rotations are applied around it)
    other     frozen entirely (the layer keeps its exact bytes)

A packed embedding table (grid) trains like a grid linear: TrainableEmbedding decodes only the
looked-up rows, and a tied head is a TrainableLinear over the same view.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from salomi.packing.bits import pack_rows, pack_trits, unpack_rows, unpack_trits
from salomi.quantizers.base import PackedLinear

FP16_MAX = 65504.0


def to_f16(t: torch.Tensor) -> np.ndarray:
    """fp16 array of t, clamped into fp16's finite range (non-finite values become 0)."""
    t = torch.nan_to_num(t.detach().float(), nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clamp(-FP16_MAX, FP16_MAX)
    return t.to(torch.float16).cpu().numpy()


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


def ste_round(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """round(clamp(u, lo, hi)) forward, identity gradient inside [lo, hi] (zero outside)."""
    c = u.clamp(lo, hi)
    return c + (torch.round(c) - c).detach()


def ste_sign(u: torch.Tensor) -> torch.Tensor:
    """+1 / -1 (u >= 0) forward, gradient of clamp(u, -1, 1)."""
    c = u.clamp(-1.0, 1.0)
    return c + (torch.where(u >= 0, 1.0, -1.0) - c).detach()


class _Lookup(torch.autograd.Function):
    """table[idx] whose backward sums the gradient per table row through a sparse [rows, len(idx)]
    one-hot matrix (CSR, built once per set of codes): 10-20x faster than embedding's backward on
    a VQ layer's 100k-400k codes into 16-256 centroids (equal up to the order of float sums)."""

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, idx: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        ctx.onehot = onehot
        return table.index_select(0, idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.onehot @ grad.contiguous(), None, None


def onehot_csr(idx: torch.Tensor, rows: int) -> torch.Tensor:
    """The [rows, len(idx)] matrix with a 1 at (idx[j], j), as int32-indexed CSR."""
    order = torch.argsort(idx, stable=True)
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.cumsum(torch.bincount(idx, minlength=rows), 0)
    ones = torch.ones(len(idx), device=idx.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the matmul used here is long-standing
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.int(), order.int(), ones, size=(rows, len(idx)), check_invariants=False)


class _VQDecode(torch.autograd.Function):
    """codebook[codes] (as [out, in]) * scale[:, None] saving nothing of weight size: backward
    rebuilds the lookup once. Keeps a VQ view's graph light enough to skip checkpointing."""

    @staticmethod
    def forward(ctx: Any, codebook: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor, onehot: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(codebook, scale)
        ctx.codes, ctx.onehot, ctx.shape = codes, onehot, shape
        return codebook.index_select(0, codes).view(shape).mul_(scale[:, None])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        codebook, scale = ctx.saved_tensors
        g_cb = g_scale = None
        if ctx.needs_input_grad[0]:
            g_cb = ctx.onehot @ (grad * scale[:, None]).view(-1, codebook.shape[1])
        if ctx.needs_input_grad[1]:
            g_scale = codebook.index_select(0, ctx.codes).view(ctx.shape).mul_(grad).sum(1)
        return g_cb, g_scale, None, None, None


class _Unrotate(torch.autograd.Function):
    """unrotate_weight (W = U^T Q V) with its adjoint as backward (dQ = U dW V^T): nothing saved,
    where autograd through the transforms would keep their intermediates."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, seed: int) -> torch.Tensor:
        from salomi.quantizers.rotation import unrotate_weight

        ctx.seed = seed
        return unrotate_weight(q, seed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        from salomi.quantizers.rotation import rotate_weight

        return rotate_weight(grad, ctx.seed), None


class Cont(nn.Module):
    """A stored continuous tensor made trainable: value = base + mag * delta."""

    def __init__(self, init: np.ndarray, relative: bool = True, mag: float | None = None) -> None:
        super().__init__()
        base = _f32(init)
        self.register_buffer("base", base)
        if mag is not None:
            m = torch.full_like(base, float(mag))
        elif relative:
            a = base.abs()
            floor = float(a.mean()) * 1e-3 + 1e-8 if a.numel() else 1e-8
            m = a.clamp(min=floor)
        else:
            m = torch.ones_like(base)
        self.register_buffer("mag", m, persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(base))

    def value(self) -> torch.Tensor:
        return self.base + self.mag * self.delta

    @torch.no_grad()
    def snap_(self) -> None:
        self.base.copy_(torch.from_numpy(to_f16(self.value()).astype(np.float32)).to(self.base.device))
        self.delta.zero_()

    def stored(self) -> np.ndarray:
        return to_f16(self.value())


class View(nn.Module):
    """Base class: weight() -> [out, in] float, pack() -> PackedLinear with the original layout."""

    trainable: str = ""
    frozen: str = ""
    light = False  # weight()'s graph saves nothing of weight size: no need to checkpoint it

    def __init__(self, p: PackedLinear) -> None:
        super().__init__()
        self.p = p

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def weight_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx of weight() (an embedding lookup); formats whose rows decode alone override it."""
        return self.weight().index_select(0, idx)

    def pack(self) -> PackedLinear:
        return PackedLinear(self.p.method, self.p.format, self.p.shape, self.new_tensors(), dict(self.p.params))

    def new_tensors(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def conts(self) -> list[Cont]:
        return [m for m in self.modules() if isinstance(m, Cont)]

    def code_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.endswith("latent")]

    @torch.no_grad()
    def snap_(self) -> None:
        for c in self.conts():
            c.snap_()

    def update_codes(self) -> int:
        """Move codes that follow their latents only between optimizer steps (VQ, also inside
        +rot / +lowrank views); returns how many moved."""
        return sum(m.update_codes() for m in self.children() if isinstance(m, View))


def _expand(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)


class GridView(View):
    def __init__(self, p: PackedLinear, train_codes: bool) -> None:
        super().__init__(p)
        self.trainable = "scale, zero" + (", codes (STE)" if train_codes else "")
        self.frozen = ", ".join((["codes"] if not train_codes else []) + (["perm"] if "perm" in p.tensors else []))
        o, i = p.shape
        self.bits, self.group = int(p.params["bits"]), int(p.params["group"])
        self.levels = (1 << self.bits) - 1
        q = torch.from_numpy(unpack_rows(p.tensors["codes"], i, self.bits).copy())  # stored column order
        self.scale = Cont(p.tensors["scale"], relative=True)
        self.zero = Cont(p.tensors["zero"], relative=False)
        if train_codes:
            self.latent = nn.Parameter(q.float())
        else:
            self.register_buffer("q", q, persistent=False)
        if "perm" in p.tensors:
            perm = torch.from_numpy(np.asarray(p.tensors["perm"]).astype(np.int64))
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel())
            self.register_buffer("inv", inv, persistent=False)
        else:
            self.inv = None

    def codes(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "latent"):
            u = self.latent if idx is None else self.latent.index_select(0, idx)
            return ste_round(u, 0.0, float(self.levels))
        return (self.q if idx is None else self.q.index_select(0, idx)).float()

    def weight(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        g = self.group
        scale, zero = self.scale.value(), self.zero.value()
        if idx is not None:
            scale, zero = scale.index_select(0, idx), zero.index_select(0, idx)
        w = _expand(scale, g) * (self.codes(idx) - _expand(zero, g))
        return w if self.inv is None else w.index_select(1, self.inv)

    def weight_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight(idx)

    def new_tensors(self) -> dict[str, np.ndarray]:
        t = dict(self.p.tensors)
        t["scale"], t["zero"] = self.scale.stored(), self.zero.stored()
        if hasattr(self, "latent"):
            c = torch.round(self.latent.detach().clamp(0, self.levels)).to(torch.uint8).cpu().numpy()
            t["codes"] = pack_rows(c, self.bits)
        return t


class SignView(View):
    def __init__(self, p: PackedLinear, train_codes: bool) -> None:
        super().__init__(p)
        self.trainable = "scale" + (", signs (STE)" if train_codes else "")
        self.frozen = "" if train_codes else "signs"
        o, i = p.shape
        self.group = int(p.params["group"])
        s = torch.from_numpy(unpack_rows(p.tensors["bits"], i, 1).astype(np.int8)) * 2 - 1
        self.scale = Cont(p.tensors["scale"], relative=True)
        if train_codes:
            self.latent = nn.Parameter(s.float())
        else:
            self.register_buffer("s", s, persistent=False)

    def weight(self) -> torch.Tensor:
        s = ste_sign(self.latent) if hasattr(self, "latent") else self.s.float()
        return _expand(self.scale.value(), self.group) * s

    def new_tensors(self) -> dict[str, np.ndarray]:
        t = dict(self.p.tensors)
        t["scale"] = self.scale.stored()
        if hasattr(self, "latent"):
            t["bits"] = pack_rows((self.latent.detach() >= 0).to(torch.uint8).cpu().numpy(), 1)
        return t


class TernaryView(View):
    def __init__(self, p: PackedLinear, train_codes: bool) -> None:
        super().__init__(p)
        self.trainable = "scale" + (", trits (STE)" if train_codes else "")
        self.frozen = "" if train_codes else "trits"
        o, i = p.shape
        self.group = int(p.params["group"])
        t = torch.from_numpy(unpack_trits(p.tensors["trits"], i).astype(np.int8)) - 1
        self.scale = Cont(p.tensors["scale"], relative=True)
        if train_codes:
            self.latent = nn.Parameter(t.float())
        else:
            self.register_buffer("t", t, persistent=False)

    def weight(self) -> torch.Tensor:
        t = ste_round(self.latent, -1.0, 1.0) if hasattr(self, "latent") else self.t.float()
        return _expand(self.scale.value(), self.group) * t

    def new_tensors(self) -> dict[str, np.ndarray]:
        t = dict(self.p.tensors)
        t["scale"] = self.scale.stored()
        if hasattr(self, "latent"):
            tr = torch.round(self.latent.detach().clamp(-1, 1)) + 1
            t["trits"] = pack_trits(tr.to(torch.uint8).cpu().numpy())
        return t


def nearest_other(cb: torch.Tensor) -> torch.Tensor:
    """Distance from each centroid to the nearest other one (inf for a lone centroid)."""
    return torch.cdist(cb, cb).fill_diagonal_(float("inf")).min(dim=1).values


def nearest_from(x: torch.Tensor, cb: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
    """Index of the centroid nearest each row of x, searching only the rows that may have left
    their guessed centroid's cell: a row closer to centroid c than half the distance from c to
    any other centroid has c as its nearest (a 0.1% margin keeps float rounding out of it).
    Latents move slowly, so most rows pass the test and the full search stays small."""
    from salomi.quantizers.vq import _nearest

    guess = guess.to(x.device)
    radius2 = (nearest_other(cb) * (0.5 * (1 - 1e-3))) ** 2
    far = ((x - cb[guess]) ** 2).sum(1) >= radius2[guess]
    out = guess.clone()
    if bool(far.any()):
        out[far] = _nearest(x[far], cb).to(out.device)
    return out


class VQView(View):
    """With train_codes and max_flip > 0, each code gets a latent vector (starting at its centroid)
    that takes the weight's gradient straight through (STE). After each optimizer step,
    update_codes() moves a code to the centroid nearest its latent -- at most `max_flip` of the
    layer's codes per step, those whose latent is furthest into the other cell (Adam moves every
    latent about lr per step, so uncapped, crowds of codes cross at once). The current codes are
    a buffer in the state dict, so a checkpoint holds them. Off by default: on the 2.10 budget
    file both the uncapped and the capped rule raised the KL (RESULTS "recover", session 19)."""

    def __init__(self, p: PackedLinear, train_codes: bool, max_flip: float = 0.0) -> None:
        super().__init__(p)
        from salomi.quantizers.base import storage_format

        codes = torch.from_numpy(storage_format("vq")._codes(p).astype(np.int64)).reshape(-1)
        cb = np.asarray(p.tensors["codebook"], dtype=np.float32)
        rms = float(np.sqrt((cb * cb).mean())) or 1.0
        self.codebook = Cont(p.tensors["codebook"], relative=False, mag=rms)
        self.scale = Cont(p.tensors["scale"], relative=True)
        self.max_flip = max_flip
        if train_codes and max_flip > 0:
            self.trainable = "codebook, scale, codes (STE latent vectors, a capped share moved per step)"
            self.frozen = ""
            self.register_buffer("codes", codes)
            # Latent unit: the codebook's median distance to a nearest other centroid, so a cell
            # boundary is about half a unit away, as for grid codes, whatever k and d.
            c = _f32(cb)
            unit = float(nearest_other(c).median()) if len(c) > 1 else 0.0
            self.unit = unit if math.isfinite(unit) and unit > 0 else rms
            self.latent = nn.Parameter(c[codes] / self.unit)
        else:
            self.trainable, self.frozen = "codebook, scale", "codes (train them with --train-codes --code-flip F)"
            self.light = True
            self.register_buffer("codes", codes, persistent=False)

    @torch.no_grad()
    def update_codes(self) -> int:
        """Move up to max_flip of the codes to the centroid nearest their latent; returns how many moved."""
        if not hasattr(self, "latent"):
            return 0
        x, cb = self.latent.detach() * self.unit, self.codebook.value().detach()
        near = nearest_from(x, cb, self.codes)
        moved = (near != self.codes).nonzero().flatten()
        if not len(moved):
            return 0
        cap = max(1, int(self.max_flip * self.codes.numel()))
        if len(moved) > cap:
            xm = x[moved]
            gain = ((xm - cb[self.codes[moved]]) ** 2).sum(1) - ((xm - cb[near[moved]]) ** 2).sum(1)
            moved = moved[torch.argsort(gain, descending=True, stable=True)[:cap]]
        self.codes[moved] = near[moved]
        return len(moved)

    def weight(self) -> torch.Tensor:
        o, i = self.p.shape
        key = (self.codes.data_ptr(), self.codes._version, self.codes.device)
        if getattr(self, "_onehot", (None,))[0] != key:  # codes moved (update_codes) or changed device
            self._onehot = (key, onehot_csr(self.codes, len(self.codebook.base)))
        if not hasattr(self, "latent"):
            return _VQDecode.apply(self.codebook.value(), self.scale.value(), self.codes, self._onehot[1], (o, i))
        v = _Lookup.apply(self.codebook.value(), self.codes, self._onehot[1])
        lat = self.latent * self.unit
        v = v + (lat - lat.detach())
        return v.reshape(o, i) * self.scale.value()[:, None]

    def new_tensors(self) -> dict[str, np.ndarray]:
        from salomi.quantizers.vq import code_bits, pack_codes

        t = dict(self.p.tensors)
        t["codebook"], t["scale"] = self.codebook.stored(), self.scale.stored()
        if hasattr(self, "latent"):
            o, i = self.p.shape
            codes = self.codes.cpu().numpy().reshape(o, i // int(self.p.params["d"]))
            t["codes"] = pack_codes(codes, code_bits(int(self.p.params["k"])))
        return t


class BiLLMView(View):
    trainable, frozen = "scale (a1, a2, a_lo, a_hi per row)", "bits, bits2, colmask"

    def __init__(self, p: PackedLinear, train_codes: bool) -> None:
        super().__init__(p)
        o, i = p.shape
        col = unpack_rows(np.asarray(p.tensors["colmask"])[None, :], i, 1)[0].astype(bool)
        self.register_buffer("col", torch.from_numpy(col)[None, :], persistent=False)
        s1 = torch.from_numpy(unpack_rows(p.tensors["bits"], i, 1).astype(np.int8)) * 2 - 1
        b2 = torch.from_numpy(unpack_rows(p.tensors["bits2"], i, 1).astype(bool))
        self.register_buffer("s1", s1, persistent=False)
        self.register_buffer("b2", b2, persistent=False)
        self.scale = Cont(p.tensors["scale"], relative=True)

    def weight(self) -> torch.Tensor:
        sc = self.scale.value()
        s1 = self.s1.float()
        s2 = self.b2.float() * 2 - 1
        sal = sc[:, 0:1] * s1 + sc[:, 1:2] * s2
        rest = s1 * torch.where(self.b2, sc[:, 3:4], sc[:, 2:3])
        return torch.where(self.col, sal, rest)

    def new_tensors(self) -> dict[str, np.ndarray]:
        t = dict(self.p.tensors)
        t["scale"] = self.scale.stored()
        return t


class PBLLMView(View):
    trainable, frozen = "scale, sal_scale or sal_val", "bits, salient positions, sal_q"

    def __init__(self, p: PackedLinear, train_codes: bool) -> None:
        super().__init__(p)
        from salomi.quantizers.base import storage_format

        o, i = p.shape
        rows, cols = storage_format("pbllm").positions(p)
        rows, cols = torch.from_numpy(np.asarray(rows, np.int64)), torch.from_numpy(np.asarray(cols, np.int64))
        s = torch.from_numpy(unpack_rows(p.tensors["bits"], i, 1).astype(np.int8)) * 2 - 1
        s[rows, cols] = 0
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.scale = Cont(p.tensors["scale"], relative=True)
        self.fp16_values = p.params.get("values") == "fp16"
        if self.fp16_values:
            self.sal_val = Cont(p.tensors["sal_val"], relative=True)
        else:
            self.register_buffer("sal_q", _f32(p.tensors["sal_q"]), persistent=False)
            self.sal_scale = Cont(p.tensors["sal_scale"], relative=True)

    def weight(self) -> torch.Tensor:
        w = self.s.float() * self.scale.value()[:, None]
        vals = self.sal_val.value() if self.fp16_values else self.sal_q * self.sal_scale.value()[self.rows]
        return w.index_put((self.rows, self.cols), vals)

    def new_tensors(self) -> dict[str, np.ndarray]:
        t = dict(self.p.tensors)
        t["scale"] = self.scale.stored()
        if self.fp16_values:
            t["sal_val"] = self.sal_val.stored()
        else:
            t["sal_scale"] = self.sal_scale.stored()
        return t


class LowRankView(View):
    """BASE+lowrank: the base's view plus (u * u_scale) @ (v * v_scale)."""

    def __init__(self, p: PackedLinear, train_codes: bool, code_flip: float = 0.0) -> None:
        super().__init__(p)
        from salomi.quantizers.lowrank import split_lowrank

        base, lr = split_lowrank(p)
        self.base = make_view(base, train_codes, code_flip)
        self.trainable = f"{self.base.trainable}; lowrank u_scale, v_scale" + (", u, v (STE)" if train_codes else "")
        self.frozen = "; ".join(x for x in (self.base.frozen, "" if train_codes else "lowrank u, v") if x)
        self.u_scale = Cont(lr["u_scale"], relative=True)
        self.v_scale = Cont(lr["v_scale"], relative=True)
        u, v = _f32(lr["u"]), _f32(lr["v"])
        if train_codes:
            self.u_latent, self.v_latent = nn.Parameter(u), nn.Parameter(v)
        else:
            self.register_buffer("u", u, persistent=False)
            self.register_buffer("v", v, persistent=False)

    def code_params(self) -> list[nn.Parameter]:
        own = [self.u_latent, self.v_latent] if hasattr(self, "u_latent") else []
        return self.base.code_params() + own

    def weight(self) -> torch.Tensor:
        if hasattr(self, "u_latent"):
            u, v = ste_round(self.u_latent, -127.0, 127.0), ste_round(self.v_latent, -127.0, 127.0)
        else:
            u, v = self.u, self.v
        return self.base.weight() + (u * self.u_scale.value()[:, None]) @ (v * self.v_scale.value()[:, None])

    def new_tensors(self) -> dict[str, np.ndarray]:
        from salomi.quantizers.lowrank import PREFIX

        t = dict(self.p.tensors)
        t.update(self.base.new_tensors())
        t[PREFIX + "u_scale"], t[PREFIX + "v_scale"] = self.u_scale.stored(), self.v_scale.stored()
        if hasattr(self, "u_latent"):
            for name, lat in (("u", self.u_latent), ("v", self.v_latent)):
                t[PREFIX + name] = torch.round(lat.detach().clamp(-127, 127)).to(torch.int8).cpu().numpy()
        return t


class FrozenView(View):
    """A format with no trainable view: the layer keeps its exact bytes."""

    trainable = ""

    def __init__(self, p: PackedLinear, train_codes: bool = False) -> None:
        super().__init__(p)
        self.frozen = f"everything (no trainable view for format {p.format!r})"
        self.register_buffer("w", p.dequantize().float(), persistent=False)

    def weight(self) -> torch.Tensor:
        return self.w

    def new_tensors(self) -> dict[str, np.ndarray]:
        return dict(self.p.tensors)


VIEWS: dict[str, type[View]] = {
    "grid": GridView,
    "sign": SignView,
    "ternary": TernaryView,
    "billm": BiLLMView,
    "pbllm": PBLLMView,
}


class RotView(View):
    """BASE+rot: the base's view in the rotated basis; W = U^T W' V is differentiable in W'."""

    def __init__(self, p: PackedLinear, train_codes: bool = False, code_flip: float = 0.0) -> None:
        from salomi.quantizers.rotation import split_rot

        super().__init__(p)
        self.inner = make_view(split_rot(p), train_codes, code_flip)
        self.seed = int(p.params["rot_seed"])
        self.trainable, self.frozen = self.inner.trainable, self.inner.frozen
        self.light = self.inner.light

    def weight(self) -> torch.Tensor:
        return _Unrotate.apply(self.inner.weight(), self.seed)

    def new_tensors(self) -> dict[str, np.ndarray]:
        return self.inner.new_tensors()


def make_view(p: PackedLinear, train_codes: bool = False, code_flip: float = 0.0) -> View:
    """The view of packed layer p; train_codes: discrete codes by STE (VQ codes only if code_flip > 0:
    the largest share of a VQ layer's codes moved per step)."""
    if p.format.endswith("+rot"):
        return RotView(p, train_codes, code_flip)
    if p.format.endswith("+lowrank"):
        return LowRankView(p, train_codes, code_flip)
    if p.format == "vq":  # the one format whose codes also need code_flip
        return VQView(p, train_codes, code_flip)
    return VIEWS.get(p.format, FrozenView)(p, train_codes)


class TrainableLinear(nn.Module):
    """A linear layer computing its weight from a View on every forward."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None, train_codes: bool = False,
                 code_flip: float = 0.0, view: View | None = None) -> None:
        super().__init__()
        self.view = view if view is not None else make_view(packed, train_codes, code_flip)  # shared: a tied head
        self.out_features, self.in_features = packed.shape
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)
        self.reuse_weight = False  # set by reused_weights()
        self._cache: tuple[tuple[int, ...], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight is built in float32 even under autocast (recovery's bf16 body): the hand-written
        # backwards of the views expect the dtypes of their forward; only the matmul runs in bf16.
        with torch.autocast(x.device.type, enabled=False):
            w = self._weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _weight(self) -> torch.Tensor:
        if self.reuse_weight and not torch.is_grad_enabled():
            # Many no-grad batches through an unchanged view (pushing calibration activations
            # through a block): rebuild the weight only when a stored value changed in place.
            key = tuple(t._version for t in (*self.view.parameters(), *self.view.buffers()))
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self.view.weight())
            w = self._cache[1]
        elif not self.view.light and torch.is_grad_enabled() and any(p.requires_grad for p in self.view.parameters()):
            # Recompute the weight's intermediates in backward instead of keeping them: only
            # the weight itself (needed by the matmul's backward) stays alive per layer.
            from torch.utils.checkpoint import checkpoint

            w = checkpoint(self.view.weight, use_reentrant=False)
        else:
            w = self.view.weight()
        return w

    def fixed_weight(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This layer as a function with its weight built once now, for many calls in one step
        (the head over chunks of tokens): the weight's gradient from every call sums into the view."""
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.view.parameters())):
            return self  # no gradient: forward() builds (or reuses) the weight as usual
        from torch.utils.checkpoint import checkpoint

        w = self.view.weight() if self.view.light else checkpoint(self.view.weight, use_reentrant=False)
        bias = self.bias
        return lambda x: F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.view.p.format}, trainable: {self.view.trainable or '-'}"


class TrainableEmbedding(nn.Module):
    """A token embedding looked up through a View (shared with a tied head): only the rows
    of the tokens in the batch are decoded, and only they get gradient."""

    def __init__(self, view: View) -> None:
        super().__init__()
        self.view = view
        self.num_embeddings, self.embedding_dim = view.p.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from salomi.quantizers.embedding import lookup_rows

        with torch.autocast(ids.device.type, enabled=False):  # float32 rows, as TrainableLinear's weight
            return lookup_rows(ids, self.num_embeddings, self.embedding_dim, self.view.weight_rows)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.view.p.format}, trainable: {self.view.trainable or '-'}"


@contextmanager
def reused_weights(model: nn.Module) -> Iterator[None]:
    """Inside the `with`, no-grad forwards of the model's TrainableLinears build each weight
    once (per change of its stored values) instead of once per call; the copies are freed
    on exit."""
    mods = [m for m in model.modules() if isinstance(m, TrainableLinear)]
    for m in mods:
        m.reuse_weight = True
    try:
        yield
    finally:
        for m in mods:
            m.reuse_weight, m._cache = False, None


def describe_views(views: dict[str, Any]) -> dict[str, Any]:
    """What is trained and what is frozen, per format (for the report); values are
    TrainableLinears or Views."""
    out: dict[str, Any] = {}
    for mod in views.values():
        v = getattr(mod, "view", mod)
        e = out.setdefault(v.p.format, {"layers": 0, "trainable": v.trainable or "-", "frozen": v.frozen or "-",
                                        "trainable_values": 0, "latent_codes": 0})
        e["layers"] += 1
        e["trainable_values"] += sum(c.delta.numel() for c in v.conts())
        e["latent_codes"] += sum(p.numel() for p in v.code_params())
    return out
