"""A quantized model as one SALOMI container file.

Tensor names:   q/<linear>/<name>   packed arrays of each quantized linear (and of a quantized
                                    embedding table, listed under "embeddings", not "layers")
                f/<param>           every other parameter (embeddings, norms, head, biases)
                tokenizer/<file>    the tokenizer's files, each zlib-compressed (metadata
                                    tokenizer_encoding = "zlib"; older files: raw bytes)
Metadata: the reference's architecture config, the recipe (method per linear), each
linear's format/shape/params, provenance (source, calibration), and the reference's
parameter count, so the file runs on its own and its bpw can be checked.
"""

from __future__ import annotations

import json
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from salomi.errors import SalomiError
from salomi.packing import container
from salomi.quantizers.base import PackedLinear

KIND = "salomi-model"


def _tokenizer_files(tokenizer: Any, compress: bool = True) -> dict[str, np.ndarray]:
    # Compressed: a BPE vocabulary is megabytes of JSON (0.2 bpw of a 135M model) and packs ~4x.
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {
            f"tokenizer/{p.name}": np.frombuffer(zlib.compress(p.read_bytes(), 9) if compress else p.read_bytes(),
                                                 dtype=np.uint8).copy()
            for p in sorted(Path(d).iterdir())
            if p.is_file()
        }


def float_state(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Every parameter not quantized, once each (tied weights share storage and are stored once)."""
    out: dict[str, np.ndarray] = {}
    for name, p in model.named_parameters():  # de-duplicates tied parameters
        if name in skip:
            continue
        keep = dtype if p.ndim >= 2 else torch.float32  # norms and biases are tiny; keep them exact
        out[f"f/{name}"] = p.detach().to(keep).cpu().numpy()
    return out


def save_quantized(
    path: str | Path,
    model: nn.Module,
    tokenizer: Any,
    packed: dict[str, PackedLinear],
    metadata: dict[str, Any],
    float_dtype: torch.dtype = torch.float16,
    embeddings: dict[str, PackedLinear] | None = None,
    compress_tokenizer: bool = True,
) -> int:
    """Write the quantized model; returns the file size. `model` supplies the unquantized parts;
    `embeddings` holds packed embedding tables / heads (module name -> packed table)."""
    tensors: dict[str, np.ndarray] = {}
    tables: dict[str, dict[str, Any]] = {"layers": {}, "embeddings": {}}
    for kind, group in (("layers", packed), ("embeddings", embeddings or {})):
        for name, p in group.items():
            p.validate()
            tables[kind][name] = {"method": p.method, "format": p.format, "shape": list(p.shape),
                                  "params": p.params, "tensors": sorted(p.tensors)}
            for t, a in p.tensors.items():
                tensors[f"q/{name}/{t}"] = a
    layers = tables["layers"]
    skip = {f"{n}.weight" for n in packed} | {f"{n}.weight" for n in embeddings or {}}
    tensors.update(float_state(model, skip, float_dtype))
    tensors.update(_tokenizer_files(tokenizer, compress_tokenizer))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    meta = {
        "kind": KIND,
        "config": cfg,
        "layers": layers,
        **({"embeddings": tables["embeddings"]} if embeddings else {}),
        **({"tokenizer_encoding": "zlib"} if compress_tokenizer else {}),
        "float_dtype": str(float_dtype).removeprefix("torch."),
        "reference_params": int(sum(p.numel() for p in model.parameters())),
        **metadata,
    }
    return container.save(path, tensors, meta)


@dataclass
class QuantizedFile:
    path: Path
    metadata: dict[str, Any]
    packed: dict[str, PackedLinear]
    floats: dict[str, np.ndarray]
    tokenizer_files: dict[str, bytes]
    file_bytes: int
    linear_bytes: int
    linear_weights: int
    embeddings: dict[str, PackedLinear]

    @property
    def reference_params(self) -> int:
        return int(self.metadata["reference_params"])

    @property
    def linear_bpw(self) -> float:
        return self.linear_bytes * 8 / self.linear_weights

    @property
    def model_bpw(self) -> float:
        return self.file_bytes * 8 / self.reference_params

    @property
    def method(self) -> str:
        return str(self.metadata.get("recipe", {}).get("label", ""))

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            for name, data in self.tokenizer_files.items():
                (Path(d) / name).write_bytes(data)
            return AutoTokenizer.from_pretrained(d)


def load_quantized(path: str | Path) -> QuantizedFile:
    c = container.load(path)
    meta = c.metadata
    if meta.get("kind") != KIND:
        raise SalomiError(f"{path}: a SALOMI container but not a quantized model (kind={meta.get('kind')!r})")
    packed: dict[str, PackedLinear] = {}
    linear_bytes = linear_weights = 0
    try:
        for name, info in meta["layers"].items():
            tensors = {t: c.tensors[f"q/{name}/{t}"] for t in info["tensors"]}
            p = PackedLinear(info["method"], info["format"], tuple(info["shape"]), tensors, info["params"])
            p.validate()
            packed[name] = p
            linear_bytes += sum(c.nbytes(f"q/{name}/{t}") for t in info["tensors"])
            linear_weights += p.n_weights
        embeddings = {}
        for name, info in meta.get("embeddings", {}).items():
            tensors = {t: c.tensors[f"q/{name}/{t}"] for t in info["tensors"]}
            p = PackedLinear(info["method"], info["format"], tuple(info["shape"]), tensors, info["params"])
            p.validate()
            embeddings[name] = p
    except KeyError as e:
        raise SalomiError(f"{path}: layer table refers to a missing tensor {e} (corrupt file)") from None
    floats = {k[2:]: v for k, v in c.tensors.items() if k.startswith("f/")}
    tok = {k[len("tokenizer/"):]: bytes(v) for k, v in c.tensors.items() if k.startswith("tokenizer/")}
    if meta.get("tokenizer_encoding") == "zlib":
        try:
            tok = {k: zlib.decompress(v) for k, v in tok.items()}
        except zlib.error:
            raise SalomiError(f"{path}: a tokenizer file does not decompress (corrupt file)") from None
    return QuantizedFile(Path(path), meta, packed, floats, tok, c.file_bytes, linear_bytes, linear_weights,
                         embeddings)


def _empty_model(config: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return m


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def build_model(qf: QuantizedFile, runtime: str = "dequant", device: str | torch.device = "cpu") -> nn.Module:
    """An nn.Module that runs the file: QuantLinear for packed layers, floats for the rest."""
    from salomi.runtime.qlinear import QuantLinear

    model = _empty_model(qf.metadata["config"])
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in qf.floats.items()}
    for name, p in qf.packed.items():
        bias = state.get(f"{name}.bias")  # a placeholder; load_state_dict below fills it
        _set_module(model, name, QuantLinear(p, bias, runtime))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if qf.embeddings:
        install_packed_embeddings(model, qf.embeddings, runtime, path=qf.path)
    meta_buffers = {name for name, b in model.named_buffers() if b.is_meta}
    model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=False)
    if unexpected:
        raise SalomiError(f"{qf.path}: tensors {unexpected[:3]} do not belong to this architecture (corrupt file?)")
    if tied and not qf.embeddings:
        model.tie_weights()
    still_missing = [k for k in missing if not _is_tied_or_buffer(model, k)]
    if still_missing:
        raise SalomiError(f"{qf.path}: missing tensors {still_missing[:3]} (corrupt or incomplete file)")
    _reset_buffers(model, device, meta_buffers - set(state))
    return model.eval()


def install_packed_embeddings(model: nn.Module, embeddings: dict[str, PackedLinear], runtime: str,
                              device: str | torch.device | None = None, path: str | Path = "") -> None:
    """QuantEmbedding for a packed input table; the head becomes a QuantLinear over the same
    packed table when tied (or over its own packed table when not). A head that is already a
    module over a packed table (a QuantLinear, or a trained one) keeps its bias."""
    from salomi.quantizers.embedding import QuantEmbedding
    from salomi.runtime.qlinear import QuantLinear

    mod_names = {m: n for n, m in model.named_modules()}
    inp_name = mod_names.get(model.get_input_embeddings(), "")
    out_mod = model.get_output_embeddings()
    out_name = mod_names.get(out_mod, "") if out_mod is not None else ""
    inp = embeddings.get(inp_name)
    if inp is None:
        raise SalomiError(f"{path or 'model'}: packed embeddings {sorted(embeddings)} do not match this architecture")
    _set_module(model, inp_name, QuantEmbedding(inp))
    head = embeddings.get(out_name, inp)  # tied: the head is the input table
    if out_name and (out_name in embeddings or _tied(model, out_mod)):
        bias = getattr(out_mod, "bias", None)
        if bias is not None:  # on a model still being built, a placeholder that load_state_dict fills
            bias = torch.zeros(bias.shape) if bias.is_meta else bias.detach().cpu()
        ql = QuantLinear(head, bias, runtime)
        _set_module(model, out_name, ql if device is None else ql.to(device))


def _tied(model: nn.Module, out_mod: nn.Module) -> bool:
    """Whether the head shares the input table (config flag; or a plain head whose weight is the input's)."""
    if getattr(model.config, "tie_word_embeddings", False):
        return True
    w = getattr(out_mod, "weight", None)
    return w is not None and w is getattr(model.get_input_embeddings(), "weight", None)


def _is_tied_or_buffer(model: nn.Module, key: str) -> bool:
    if key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False):
        return True
    return key in dict(model.named_buffers())


def _reset_buffers(model: nn.Module, device: str | torch.device, names: set[str]) -> None:
    """Buffers (rotary frequencies, causal masks) were created on the meta device: rebuild
    each owning module from the config on the CPU (small), falling back to one full
    fresh model only for modules that cannot be built that way."""
    owners = {name.rpartition(".")[0] for name in names}
    fresh_model = None
    for owner in sorted(owners):
        mod = model.get_submodule(owner) if owner else model
        try:
            fresh = type(mod)(config=model.config)
        except TypeError:
            if fresh_model is None:
                from transformers import AutoModelForCausalLM

                fresh_model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
            fresh = fresh_model.get_submodule(owner) if owner else fresh_model
        for key in list(mod._buffers):
            if mod._buffers[key] is not None and (f"{owner}.{key}" if owner else key) in names:
                mod._buffers[key] = fresh._buffers[key].to(device)
        for attr, val in vars(fresh).items():  # plain tensor attributes (e.g. original_inv_freq)
            if isinstance(val, torch.Tensor) and not attr.startswith("_"):
                setattr(mod, attr, val.to(device))


def describe(qf: QuantizedFile) -> dict[str, Any]:
    """What `salomi inspect --json` prints."""
    layers = [
        {"name": n, "method": p.method, "format": p.format, "shape": list(p.shape), "bytes": p.nbytes,
         "bpw": p.bpw}
        for n, p in qf.packed.items()
    ]
    return {
        "file": str(qf.path),
        "file_bytes": qf.file_bytes,
        "model": qf.metadata.get("model", {}).get("name"),
        "method": qf.method,
        "linear_bpw": qf.linear_bpw,
        "model_bpw": qf.model_bpw,
        "linear_bytes": qf.linear_bytes,
        "linear_weights": qf.linear_weights,
        "reference_params": qf.reference_params,
        "float_dtype": qf.metadata.get("float_dtype"),
        "recipe": qf.metadata.get("recipe"),
        "layers": layers,
        "embeddings": [
            {"name": n, "method": p.method, "format": p.format, "shape": list(p.shape), "bytes": p.nbytes,
             "bpw": p.bpw}
            for n, p in qf.embeddings.items()
        ],
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
