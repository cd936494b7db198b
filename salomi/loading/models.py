"""Load a reference model: a GGUF file, a Hugging Face directory, or a hub id.

Everything becomes a float32 `transformers` causal LM plus its tokenizer. GGUF files
are dequantized tensor by tensor by `transformers` (which uses the `gguf` package, so
every GGUF type it knows loads, i-quants included) and converted once into a cached
Hugging Face directory, so later loads are plain safetensors reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from salomi.errors import SalomiError

DEFAULT_MODEL = "smollm2"


@dataclass
class Reference:
    name: str
    source: str
    model: nn.Module
    tokenizer: object
    hf_dir: Path | None

    @property
    def n_params(self) -> int:
        return count_params(self.model)


def count_params(model: nn.Module) -> int:
    # Tied embeddings count once: parameters() de-duplicates shared tensors.
    return sum(p.numel() for p in model.parameters())


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve(model: str) -> str:
    """Map short names to real sources (the embedded default is fetched on demand)."""
    if model in (DEFAULT_MODEL, "default"):
        from salomi.assets import ensure

        return str(ensure("smollm2"))
    return model


def gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Convert a GGUF file into a cached float32 Hugging Face directory (once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from salomi.assets import cache_dir

    out = cache_dir() / "hf" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    if (out / "salomi-complete").exists():
        return out
    _quiet_transformers()
    print(f"[salomi] converting {gguf_path.name} to float32 (one time)...", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        m = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise SalomiError(f"{gguf_path}: cannot load this GGUF as a causal LM ({str(e).splitlines()[0]})") from None
    # Drop the "this came from GGUF" marker so the directory is a plain float checkpoint.
    m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    m.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    m.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "salomi-complete").write_text(json.dumps({"gguf": str(gguf_path)}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_reference(model: str = DEFAULT_MODEL, device: str | torch.device = "cpu") -> Reference:
    """Load the unquantized model in float32, in eval mode, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    source = resolve(model)
    path = Path(source)
    if path.suffix == ".gguf" or (path.exists() and path.is_file()):
        if not path.exists():
            raise SalomiError(f"{path}: no such GGUF file")
        if path.suffix != ".gguf":
            raise SalomiError(f"{path}: not a model (give a .gguf file, a Hugging Face model directory or a hub id)")
        hf_dir = gguf_to_hf_dir(path)
        name = path.stem
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise SalomiError(f"{path}: no config.json here; give a Hugging Face model directory or a .gguf file")
        hf_dir, name = path, path.name
    elif os.sep in source or source.startswith("."):
        raise SalomiError(f"{source}: no such file or directory")
    else:
        hf_dir, name = None, source  # a hub id: works for users who are online
    where = str(hf_dir) if hf_dir is not None else source
    try:
        config = AutoConfig.from_pretrained(where)
        archs = config.architectures or []
        causal = (any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) if archs
                  else type(config).__name__ in _CAUSAL_CONFIGS())
        if not causal:
            what = ", ".join(archs) or type(config).__name__
            raise SalomiError(f"{where}: {what} is not a causal language model; give a *ForCausalLM checkpoint")
        tok = AutoTokenizer.from_pretrained(where)
        m = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
    except SalomiError:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise SalomiError(f"{where}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    m.eval().to(device)
    return Reference(name=name, source=source, model=m, tokenizer=tok, hf_dir=hf_dir)


def _CAUSAL_CONFIGS() -> set[str]:  # noqa: N802
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {CONFIG_MAPPING_NAMES[k] for k in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if k in CONFIG_MAPPING_NAMES}


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, whatever the architecture calls it."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            best = mod
            break
    if best is None:
        raise SalomiError(f"cannot find the {n} transformer blocks of {type(model).__name__}")
    return best


def linear_names(model: nn.Module) -> dict[int, dict[str, nn.Module]]:
    """Block index -> {full linear name: module}: the names a packed file stores layers under."""
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    return {i: {f"{prefix}.{i}.{n}": m for n, m in block_linears(b).items()} for i, b in enumerate(blocks)}


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear-like layers of one block (nn.Linear and GPT-2's Conv1D), by relative name."""
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear | Conv1D)}


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """Weight as [out, in] (Conv1D stores it transposed)."""
    from transformers.pytorch_utils import Conv1D

    return mod.weight.detach().t() if isinstance(mod, Conv1D) else mod.weight.detach()
