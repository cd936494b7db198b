"""Shared fixtures: tiny random models written to disk with the real GPT-2 tokenizer,
and short slices of the real texts (so tests on them take seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    from salomi.assets import ensure

    return ensure("gpt2-tokenizer")


def _save_tiny(config, tok_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, GPT2TokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    GPT2TokenizerFast.from_pretrained(str(tok_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path) -> Path:
    from transformers import GPT2Config

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=512, vocab_size=50257)
    return _save_tiny(cfg, gpt2_tokenizer_dir, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path) -> Path:
    return _save_tiny(_tiny_llama_config(tied=True), gpt2_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def untied_llama_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path) -> Path:
    """The tiny Llama with its own output head (not tied to the embedding table)."""
    return _save_tiny(_tiny_llama_config(tied=False), gpt2_tokenizer_dir,
                      tmp_path_factory.mktemp("untied-llama"))


def _tiny_llama_config(tied: bool):  # noqa: ANN202
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50257, max_position_embeddings=512,
                      tie_word_embeddings=tied, bos_token_id=50256, eos_token_id=50256)


@pytest.fixture(scope="session")
def brown_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from salomi.data.texts import load_text

    p = tmp_path_factory.mktemp("texts") / "brown_slice.txt"
    p.write_text(load_text("brown")[:40_000])
    return p


@pytest.fixture(scope="session")
def austen_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from salomi.data.texts import load_text

    p = tmp_path_factory.mktemp("texts") / "austen_slice.txt"
    p.write_text(load_text("austen")[:80_000])
    return p


@pytest.fixture(scope="session")
def packed(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama packed with rtn:2:g32 (read-only: tests copy it before damaging it)."""
    from salomi import api

    out = tmp_path_factory.mktemp("packed") / "m.salomi"
    api.quantize(model=str(tiny_llama_dir), method="rtn:2:g32", out=out, progress=False)
    return out
