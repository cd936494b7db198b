"""Perplexity, KL(reference || quantized) and top-1 agreement on identical windows.

Protocol (shared/DESIGN.md): tokenize the text once, cut non-overlapping windows of
`seq_len` tokens from the start, score every token after the first of each window.
The reference and every candidate model see the same windows; the reference's
logits are computed once per window and compared with each candidate in turn, so
evaluating several models costs one reference pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from salomi.errors import SalomiError


@dataclass
class Protocol:
    text: str
    seq_len: int = 1024
    windows: int = 64

    def key(self) -> dict[str, Any]:
        return {"text": self.text, "seq_len": self.seq_len, "windows": self.windows}


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def make_windows(ids: torch.Tensor, seq_len: int, windows: int, text_name: str = "text") -> torch.Tensor:
    if seq_len < 2:
        raise SalomiError(f"--seq-len must be at least 2 (got {seq_len})")
    if windows < 1:
        raise SalomiError(f"--windows must be at least 1 (got {windows})")
    available = ids.numel() // seq_len
    if available == 0:
        raise SalomiError(
            f"{text_name}: {ids.numel()} tokens is shorter than one window of {seq_len}; use a longer text or a smaller --seq-len"
        )
    if available < windows:
        raise SalomiError(
            f"{text_name}: only {available} windows of {seq_len} tokens (asked for {windows}); lower --windows or --seq-len"
        )
    return ids[: windows * seq_len].view(windows, seq_len)


@dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0

    def result(self) -> dict[str, float]:
        return {
            "ppl": math.exp(self.nll / self.tokens),
            "nll": self.nll / self.tokens,
            "kl": self.kl / self.tokens,
            "top1": self.agree / self.tokens,
        }


def _logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = model(window[None].to(device), use_cache=False)
    return out.logits[0, :-1].float().cpu()


@torch.inference_mode()
def evaluate(
    reference: nn.Module,
    candidates: Sequence[nn.Module],
    windows: torch.Tensor,
    progress: bool = True,
    label: str = "eval",
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Score the reference and each candidate; returns (reference metrics, candidate metrics)."""
    from salomi.progress import bar as progress_bar

    ref_acc = _Acc()
    accs = [_Acc() for _ in candidates]
    bar = progress_bar(len(windows) * (1 + len(candidates)), label, "fwd", disable=not progress)
    for w in windows:
        targets = w[1:]
        ref_logp = F.log_softmax(_logits(reference, w), dim=-1)
        bar.update(1)
        ref_acc.nll += -ref_logp.gather(1, targets[:, None]).sum().item()
        ref_acc.tokens += targets.numel()
        ref_top = ref_logp.argmax(dim=-1)
        ref_acc.agree += targets.numel()
        ref_p = ref_logp.exp()
        for m, acc in zip(candidates, accs):
            logp = F.log_softmax(_logits(m, w), dim=-1)
            acc.nll += -logp.gather(1, targets[:, None]).sum().item()
            acc.kl += (ref_p * (ref_logp - logp)).sum().item()
            acc.agree += (logp.argmax(dim=-1) == ref_top).sum().item()
            acc.tokens += targets.numel()
            bar.update(1)
    bar.close()
    ref = ref_acc.result()
    ref["kl"] = 0.0
    rows = []
    for acc in accs:
        r = acc.result()
        r["ref_ppl"] = ref["ppl"]
        r["ratio"] = r["ppl"] / ref["ppl"]
        rows.append(r)
    return ref, rows


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = True, label: str = "ppl") -> float:
    from salomi.progress import bar as progress_bar

    nll, n = 0.0, 0
    for w in progress_bar(len(windows), label, "win", disable=not progress, iterable=windows):
        logp = F.log_softmax(_logits(model, w), dim=-1)
        nll += -logp.gather(1, w[1:, None]).sum().item()
        n += w.numel() - 1
    return math.exp(nll / n)


def reference_cache_key(model_id: str, protocol: Protocol, windows: torch.Tensor) -> str:
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    blob = json.dumps({"model": model_id, **protocol.key(), "tokens": digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_reference_ppl(key: str) -> float | None:
    from salomi.assets import cache_dir

    f = cache_dir() / "refppl" / f"{key}.json"
    return json.loads(f.read_text())["ppl"] if f.exists() else None


def store_reference_ppl(key: str, ppl: float, info: dict[str, Any]) -> None:
    from salomi.assets import cache_dir

    d = cache_dir() / "refppl"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{key}.json.tmp"
    tmp.write_text(json.dumps({"ppl": ppl, **info}))
    tmp.replace(d / f"{key}.json")


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
