"""Trained views -> packed layers with the identical layout -> a new .salomi file.

Each view's continuous values are rounded to fp16 (codes re-derived by the same
rounding the STE used), giving a PackedLinear with the same format, params and tensor
names, dtypes and shapes as the one it came from: only values change, so every
tensor -- and the data section of the file -- has exactly the original byte count.
The file is written by `save_quantized` with the source's metadata plus a "recovery"
record; the unquantized tensors and the tokenizer are carried over byte for byte.
`check_same_layout` verifies all of this after writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from salomi.errors import SalomiError
from salomi.packing import container
from salomi.packing.model_file import QuantizedFile, load_quantized, save_quantized
from salomi.quantizers.base import PackedLinear


class RawTokenizer:
    """Stands in for a tokenizer in save_quantized: writes the source file's tokenizer bytes unchanged."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def save_pretrained(self, d: str | Path) -> None:
        for name, data in self.files.items():
            (Path(d) / name).write_bytes(data)


def repack_views(views: dict[str, Any]) -> dict[str, PackedLinear]:
    """name -> new PackedLinear from name -> TrainableLinear (or View), checked against the original layout."""
    out: dict[str, PackedLinear] = {}
    for name, mod in views.items():
        view = getattr(mod, "view", mod)
        old = view.p
        new = view.pack()
        new.validate()
        _same_packed_layout(name, old, new)
        out[name] = new
    return out


def _same_packed_layout(name: str, old: PackedLinear, new: PackedLinear) -> None:
    if (old.format, tuple(old.shape), old.params, old.method) != (new.format, tuple(new.shape), new.params, new.method):
        raise SalomiError(f"repack changed the description of layer {name}")
    if sorted(old.tensors) != sorted(new.tensors):
        raise SalomiError(f"repack changed the tensor set of layer {name}")
    for t, a in old.tensors.items():
        b = new.tensors[t]
        if np.asarray(a).dtype != b.dtype or tuple(np.shape(a)) != tuple(b.shape):
            raise SalomiError(f"repack changed {name}/{t}: {np.asarray(a).dtype}{list(np.shape(a))} -> {b.dtype}{list(b.shape)}")


def float_dtype_of(qf: QuantizedFile) -> torch.dtype:
    name = str(qf.metadata.get("float_dtype", "float16"))
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def install_quantlinears(model: nn.Module, packed: dict[str, PackedLinear]) -> None:
    """Put QuantLinear(packed) back where the TrainableLinears were (biases kept)."""
    from salomi.packing.model_file import _set_module
    from salomi.runtime.qlinear import QuantLinear

    for name, p in packed.items():
        mod = model.get_submodule(name)
        bias = getattr(mod, "bias", None)
        ql = QuantLinear(p, None if bias is None else bias.detach().cpu(), "dequant")
        dev = next((b.device for b in mod.buffers()), torch.device("cpu"))
        _set_module(model, name, ql.to(dev))


def install_embeddings(model: nn.Module, embeddings: dict[str, PackedLinear]) -> None:
    """Put the packed-table modules (QuantEmbedding, and a QuantLinear head) back where the trained ones were."""
    from salomi.packing.model_file import install_packed_embeddings

    dev = next((b.device for b in model.buffers()), torch.device("cpu"))
    install_packed_embeddings(model, embeddings, "dequant", dev)


def save_recovered(
    out: str | Path, source: QuantizedFile, model: nn.Module, packed: dict[str, PackedLinear], record: dict[str, Any],
    embeddings: dict[str, PackedLinear] | None = None,
) -> int:
    """Write the recovered file: source metadata + a "recovery" record (appended to any earlier ones).
    `embeddings`: the trained packed tables (default: the source's, unchanged)."""
    meta = {k: v for k, v in source.metadata.items()}
    prev = meta.get("recovery")
    meta["recovery"] = ([*prev] if isinstance(prev, list) else ([prev] if prev else [])) + [record]
    if len(packed) != len(source.packed) or set(packed) != set(source.packed):
        raise SalomiError("repack: the set of quantized layers changed")
    if embeddings is None:
        embeddings = source.embeddings
    if set(embeddings) != set(source.embeddings):
        raise SalomiError("repack: the set of packed embedding tables changed")
    for name, p in embeddings.items():
        _same_packed_layout(name, source.embeddings[name], p)
    # keep the source's tokenizer encoding (files written before compression store raw bytes): same layout
    size = save_quantized(out, model, RawTokenizer(source.tokenizer_files), packed, meta, float_dtype_of(source),
                          embeddings, source.metadata.get("tokenizer_encoding") == "zlib")
    check_same_layout(source.path, out)
    return size


def check_same_layout(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Raise unless dst has the same tensors (names, dtypes, shapes, offsets) as src, the same
    unquantized/tokenizer bytes, and so the same data bytes and linear bpw. Returns the byte counts."""
    a, b = container.load(src), container.load(dst)
    if sorted(a.entries) != sorted(b.entries):
        raise SalomiError(f"{dst}: tensor set differs from {src}")
    for n, ea in a.entries.items():
        eb = b.entries[n]
        if (ea["dtype"], ea["shape"], ea["offsets"]) != (eb["dtype"], eb["shape"], eb["offsets"]):
            raise SalomiError(f"{dst}: tensor {n} changed layout")
        if not n.startswith("q/") and ea["crc32"] != eb["crc32"]:
            raise SalomiError(f"{dst}: unquantized tensor {n} changed value")
    data_a = a.file_bytes - _header_bytes(a)
    data_b = b.file_bytes - _header_bytes(b)
    if data_a != data_b:
        raise SalomiError(f"{dst}: data section is {data_b} bytes, source has {data_a}")
    qa, qb = load_quantized(src), load_quantized(dst)
    if (qa.linear_bytes, qa.linear_weights) != (qb.linear_bytes, qb.linear_weights):
        raise SalomiError(f"{dst}: linear bytes changed ({qa.linear_bytes} -> {qb.linear_bytes})")
    return {"data_bytes": data_a, "linear_bytes": qa.linear_bytes, "header_bytes_src": _header_bytes(a),
            "header_bytes_dst": _header_bytes(b)}


def _header_bytes(c: container.Container) -> int:
    """Preamble + JSON header: everything before the 8-aligned data section."""
    data_bytes = max((e["offsets"][1] for e in c.entries.values()), default=0)  # end of the last tensor
    return c.file_bytes - data_bytes
