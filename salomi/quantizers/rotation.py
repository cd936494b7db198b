"""`+rot`: incoherence processing (QuIP-style) around any base method.

The base quantizes W' = U W V^T against H' = V H V^T, where V (in x in) and U (out x out)
are randomized Hadamard transforms: V = H_n diag(s) / sqrt(n) with H_n a Hadamard matrix
and s random signs drawn from a seed. Rotations spread outlier weights and outlier input
channels over every coordinate, so a 1-2-bit grid or codebook fits far better, and since
U, V are orthogonal, tr(dW' H' dW'^T) = tr(dW H dW^T): the base minimises the same output
error as without rotation. The file stores no extra tensor: U and V are rebuilt from the
seed and the shape (the seed sits in the layer's params), so bpw is the base's.

Hadamard orders: H_n = H_12^(x b) (x) H_20^(x c) (x) H_2^(x a) for n = 12^b 20^c 2^a
(Sylvester for powers of two, Paley's construction for 12 and 20). That covers the usual
widths (576 = 12^2 4, 1536 = 12 128, 192, 768, 2048, 3072, 4096...); any other width is
refused with a one-line error. The transform of a vector costs O(n (12 b + 20 c + 2 a)),
so the kernels can rotate activations on the fly: y = U^T (Q' (V x)).

Format "BASE+rot": W = U^T BASE.dequantize() V; params add rot_seed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from salomi.errors import SalomiError
from salomi.quantizers.base import COMPOSITES, PackedLinear, Quantizer, StorageFormat, storage_format

SUFFIX = "+rot"
MAX_SEED = 2**31 - 2  # U uses seed + 1, so both stay below 2**31


def _paley(q: int) -> np.ndarray:
    """Hadamard matrix of order q + 1 for a prime q = 3 (mod 4) (Paley construction I)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
    jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + np.eye(q + 1, dtype=np.int64)


_BASES = {12: _paley(11), 20: _paley(19), 2: np.array([[1, 1], [1, -1]])}


@lru_cache(maxsize=64)
def factors(n: int) -> tuple[int, ...]:
    """Orders of the Hadamard blocks whose Kronecker product has order n (powers of two merged up to 64)."""
    out: list[int] = []
    m = n
    for f in (12, 20):
        while m % f == 0:
            out.append(f)
            m //= f
    two = 1
    while m % 2 == 0:
        m //= 2
        two *= 2
        if two == 64:
            out.append(two)
            two = 1
    if two > 1:
        out.append(two)
    if m != 1 or n < 2:
        raise SalomiError(
            f"+rot: no Hadamard transform of order {n} (supported: 12^b * 20^c * 2^a); drop +rot for this model"
        )
    return tuple(out)


@lru_cache(maxsize=64)
def _signs(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, n])
    return torch.from_numpy(rng.integers(0, 2, n).astype(np.float32) * 2 - 1)


@lru_cache(maxsize=16)
def _mats(n: int) -> tuple[torch.Tensor, ...]:
    out = []
    for f in factors(n):
        if f in (12, 20):
            m = _BASES[f]
        else:  # Sylvester: H_2^(x log2 f)
            m = np.ones((1, 1), dtype=np.int64)
            while m.shape[0] < f:
                m = np.kron(m, _BASES[2])
        out.append(torch.from_numpy(m.astype(np.float64)))
    return tuple(out)


@lru_cache(maxsize=64)
def _pair(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """H_n = kron(A, B) as two dense blocks, split where a + b is least (576 -> 12 x 48,
    1536 -> 12 x 128), with 1/sqrt(n) folded into B. Two dense matmuls over the whole
    tensor beat one small contraction (and a permuted copy) per Hadamard factor: 3-4x
    faster on the default model's weights, forward and backward."""
    mats = _mats(n)
    sizes = [m.shape[0] for m in mats]
    k = min(range(len(mats) + 1), key=lambda j: int(np.prod(sizes[:j])) + int(np.prod(sizes[j:])))
    a, b = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    for m in mats[:k]:
        a = torch.kron(a, m)
    for m in mats[k:]:
        b = torch.kron(b, m)
    return a.to(device, dtype), (b / float(np.sqrt(n))).to(device, dtype)


def transform(x: torch.Tensor, seed: int, inverse: bool = False, dim: int = -1) -> torch.Tensor:
    """V x along dim (-1: every row; 0: every column of a 2-D x), V = H diag(s) / sqrt(n);
    with inverse, V^T x. Differentiable."""
    if dim not in (-1, 0, x.dim() - 1):
        raise ValueError("transform runs along the last dim or, for a 2-D tensor, dim 0")
    last = dim != 0 or x.dim() == 1
    n = x.shape[-1] if last else x.shape[0]
    s = _signs(n, seed).to(x.device, x.dtype)
    if not last:
        s = s.reshape(n, *([1] * (x.dim() - 1)))
    a, b = _pair(n, x.dtype, str(x.device))
    if inverse:
        a, b = a.T, b.T
    y = x if inverse else x * s
    na, nb = a.shape[0], b.shape[0]
    if last:  # each row as an [na, nb] matrix X: A X B^T
        shape = y.shape
        y = y.reshape(-1, nb) @ b.T
        y = torch.matmul(a, y.reshape(-1, na, nb)).reshape(shape)
    else:  # each column likewise, over all columns at once
        m = y.shape[1]
        y = (a @ y.reshape(na, nb * m)).reshape(na, nb, m)
        y = torch.matmul(b, y).reshape(n, m)
    return y * s if inverse else y


def rotate_weight(w: torch.Tensor, seed: int) -> torch.Tensor:
    """W' = U W V^T (U from seed + 1 over the output dim, V from seed over the input dim)."""
    return transform(transform(w.float(), seed), seed + 1, dim=0)


def unrotate_weight(q: torch.Tensor, seed: int) -> torch.Tensor:
    """U^T Q V."""
    return transform(transform(q.float(), seed, inverse=True), seed + 1, inverse=True, dim=0)


def rotate_hessian(h: torch.Tensor, seed: int) -> torch.Tensor:
    """V H V^T (float64 in, float64 out)."""
    return transform(transform(h.double(), seed), seed, dim=0)


def rot_seed(p: PackedLinear, where: str | None = None) -> int:
    """The layer's rotation seed, refused unless it is one the grammar can write (0..MAX_SEED)."""
    seed = p.params.get("rot_seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise SalomiError(f"{where or f'packed layer ({p.method})'}: no valid rot_seed (corrupt file?)")
    return seed


def split_rot(p: PackedLinear) -> PackedLinear:
    if not p.format.endswith(SUFFIX):
        raise SalomiError(f"packed layer format {p.format!r} has no rotation")
    params = {k: v for k, v in p.params.items() if k != "rot_seed"}
    return PackedLinear(p.method, p.format[: -len(SUFFIX)], p.shape, p.tensors, params)


class RotFormat(StorageFormat):
    """BASE+rot: W = U^T BASE.dequantize() V; params: rot_seed (int) plus the base's params."""

    def __init__(self, base: str) -> None:
        self.base = storage_format(base)
        self.name = base + SUFFIX

    def validate(self, p: PackedLinear) -> None:
        rot_seed(p)
        factors(p.shape[0])
        factors(p.shape[1])
        self.base.validate(split_rot(p))

    def dequantize(self, p: PackedLinear) -> torch.Tensor:
        return unrotate_weight(self.base.dequantize(split_rot(p)), rot_seed(p))


COMPOSITES[SUFFIX[1:]] = RotFormat


class RotQuantizer(Quantizer):
    needs_hessian = True

    def __init__(self, base: Quantizer, seed: int = 0) -> None:
        self.base, self.seed = base, seed
        self.spec = f"{base.spec}+rot" + (f":s{seed}" if seed else "")

    def check_shape(self, shape: tuple[int, int]) -> None:
        factors(shape[0])
        factors(shape[1])
        self.base.check_shape(shape)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        self.check_shape(tuple(weight.shape))
        w = rotate_weight(weight.detach().cpu(), self.seed)
        h = None
        if hessian is not None:
            hd = hessian.detach().cpu().double().clone()
            dead = torch.diag(hd) <= 0  # a dead input is zero in every sample: keep it out of the rotated H
            hd[dead, :] = 0
            hd[:, dead] = 0
            h = rotate_hessian(hd, self.seed).float()
        p = self.base.quantize(w, h if self.base.needs_hessian else None)
        if "rot_seed" in p.params:
            raise SalomiError(f"{self.spec}: the base is already rotated; use one +rot")
        return PackedLinear(self.spec, p.format + SUFFIX, p.shape, p.tensors, {**p.params, "rot_seed": self.seed})


def wrap_rot(spec: str, base: Quantizer, *args: str) -> RotQuantizer:
    from salomi.quantizers.spec import int_arg

    if len(args) > 1:
        raise TypeError
    return RotQuantizer(base, int_arg(spec, args[0], "s", 0, MAX_SEED) if args else 0)
