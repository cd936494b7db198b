"""Calibration segments: fixed-length token slices drawn from a text with a seed."""

from __future__ import annotations

import torch

from salomi.errors import SalomiError


def calibration_segments(ids: torch.Tensor, n_segments: int, seg_len: int, seed: int, text_name: str) -> torch.Tensor:
    if ids.numel() < seg_len + 1:
        raise SalomiError(f"{text_name}: {ids.numel()} tokens is too short for calibration segments of {seg_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seg_len, (n_segments,), generator=g)
    return torch.stack([ids[s : s + seg_len] for s in starts.tolist()])
