"""Quantize a model block by block, each block seeing the outputs of the already
quantized blocks before it (GPTQ's sequential scheme).

For every linear of a block the input Hessian H = 2/n * sum(x x^T) is accumulated
from the block's current inputs; each linear is then quantized with its method and
its float weight replaced by the dequantized one, and the block is run again to give
the next block its (quantized) inputs. Peak memory: the model, one block's
Hessians, and the calibration activations.

With `true_sequential` the linears of a block go in groups that read the same input, in
the order the block calls them (Llama: q/k/v, o, gate/up, down), and each group's
Hessians are taken with the groups before it already quantized: o_proj and down_proj are
fitted to the inputs the quantized model will really give them. Measured on SmolLM2 with
vq:d4:k256+ls+rot (docs/RESULTS.md) it changed the ratio by -2% and +0.1% on two seeds, so
the default stays one float pass per block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from salomi.loading.models import decoder_blocks, linear_names, linear_weight
from salomi.quantizers.base import PackedLinear, Quantizer


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is skipped."""


def _set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    from transformers.pytorch_utils import Conv1D

    mod.weight.data.copy_(w.t() if isinstance(mod, Conv1D) else w)


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, segments: torch.Tensor, batch: int) -> list[tuple]:
    """Run the model up to block 0 and keep what block 0 receives (args, kwargs) per batch."""
    captured: list[tuple] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise StopForward

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_batches(model, segments, batch)
    finally:
        h.remove()
    return captured


def run_batches(model: nn.Module, segments: torch.Tensor, batch: int) -> None:
    """Forward every batch of `segments` through `model`, for its hooks (a StopForward ends a batch)."""
    device = next(model.parameters()).device
    for i in range(0, len(segments), batch):
        try:
            model(segments[i : i + batch].to(device), use_cache=False)
        except StopForward:
            pass


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder block returns (some return a tuple, some a tensor)."""
    return out[0] if isinstance(out, tuple | list) else out


def input_groups(block: nn.Module, layer: dict[str, nn.Module], args: tuple, kwargs: dict) -> list[list[str]]:
    """The linears of `layer` grouped by shared input, in the order one forward pass of
    `block` calls them (linears it never calls come last, one group each)."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: calls.append((n, a[0]))) for n, m in layer.items()]
    try:
        with torch.no_grad():
            block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last: torch.Tensor | None = None
    for n, x in calls:
        if any(n in g for g in groups):
            continue
        if groups and x is last:
            groups[-1].append(n)
        else:
            groups.append([n])
        last = x
    seen = {n for g in groups for n in g}
    return groups + [[n] for n in layer if n not in seen]


@contextmanager
def accumulate_hessians(layer: dict[str, nn.Module], stop: bool = False,
                        dtype: torch.dtype = torch.float32) -> Iterator[dict[str, torch.Tensor]]:
    """H = 2/n * sum(x x^T) of each linear's input over the forward passes run inside the
    `with`; the dict is complete (normalised) once the block exits. With `stop`, a forward
    pass ends (StopForward) once every linear of `layer` has seen its input, e.g. the head:
    no logits computed."""
    hessians: dict[str, torch.Tensor] = {}
    counts = {n: 0 for n in layer}
    seen: set[str] = set()
    hooks = []
    # Linears called on the very same tensor (q/k/v, gate/up) would add the same x^T x: on the
    # first pass each such linear is made an alias of the first one called on that tensor, its
    # Hessian copied at the end (the same bits, a third less Hessian arithmetic per Llama block).
    # Later passes must call it on its source's tensor again, or this raises, never a wrong H.
    last: dict[str, Any] = {"x": None, "name": None}
    alias: dict[str, str] = {}
    passes = {n: 0 for n in layer}
    for n, m in layer.items():
        cols = linear_weight(m).shape[1]
        hessians[n] = torch.zeros(cols, cols, device=m.weight.device, dtype=dtype)

        def acc(_mod: nn.Module, args: tuple, n: str = n, h: torch.Tensor = hessians[n]) -> None:
            same = args[0] is last["x"]
            if passes[n] == 0 and same:
                alias[n] = last["name"]
            passes[n] += 1
            if n in alias:
                if not same or last["name"] != alias[n]:
                    raise RuntimeError(f"{n} shared its input with {alias[n]} on the first calibration pass but "
                                       f"not on pass {passes[n]}: its Hessian cannot be shared")
                counts[n] = counts[alias[n]]
            else:
                x = args[0].reshape(-1, args[0].shape[-1]).to(dtype)
                h.addmm_(x.t(), x)
                counts[n] += x.shape[0]
                last["x"], last["name"] = args[0], n
            seen.add(n)
            if stop and len(seen) == len(layer):
                seen.clear()
                raise StopForward

        hooks.append(m.register_forward_pre_hook(acc))
    try:
        yield hessians
    finally:
        for h in hooks:
            h.remove()
        last["x"] = None  # no reference to the last activation once done
    for n, src in alias.items():
        hessians[n].copy_(hessians[src])
    for n in hessians:
        hessians[n].mul_(2.0 / max(counts[n], 1))


@torch.no_grad()
def quantize_sequential(
    model: nn.Module,
    choose: Callable[[str], Quantizer],
    segments: torch.Tensor | None,
    batch: int = 8,
    progress: bool = True,
    on_block_done: Callable[[int, dict[str, PackedLinear]], None] | None = None,
    done: dict[str, PackedLinear] | None = None,
    true_sequential: bool = False,
) -> dict[str, PackedLinear]:
    """Quantize every block linear of `model` in place; returns name -> PackedLinear.

    `choose(name)` gives the quantizer for a linear. `segments` (calibration token ids)
    may be None when no chosen quantizer needs a Hessian. `done` holds layers of an
    interrupted run: they are re-applied, not recomputed.
    """
    from salomi.progress import bar as progress_bar

    blocks = decoder_blocks(model)
    names = linear_names(model)
    need_h = any(choose(n).needs_hessian for layer in names.values() for n in layer)
    packed: dict[str, PackedLinear] = dict(done or {})
    total = sum(len(v) for v in names.values())
    bar = progress_bar(total, "quantize", "layer", disable=not progress)
    inputs = capture_block_inputs(model, blocks, segments, batch) if need_h and segments is not None else None
    for i, block in enumerate(blocks):
        layer = names[i]
        groups = [list(layer)]
        if inputs is not None and true_sequential:
            groups = input_groups(block, layer, *inputs[0])
        for group in groups:
            for n in group:  # layers of an interrupted run first: later Hessians see them quantized
                if n in packed:
                    _set_weight(layer[n], packed[n].dequantize().to(layer[n].weight.device))
                    bar.update(1)
            todo = [n for n in group if n not in packed]
            hessians: dict[str, torch.Tensor] = {}
            if inputs is not None and any(choose(n).needs_hessian for n in todo):
                with accumulate_hessians({n: layer[n] for n in todo}, stop=True) as hessians:
                    for args, kwargs in inputs:
                        try:
                            block(*args, **kwargs)
                        except StopForward:
                            pass
            for n in todo:
                m = layer[n]
                q = choose(n)
                w = linear_weight(m).float()
                p = q.quantize(w, hessians.get(n) if q.needs_hessian else None)
                packed[n] = p
                _set_weight(m, p.dequantize().to(w.device))
                bar.set_postfix_str(f"{n.rsplit('.', 2)[-2]}.{n.rsplit('.', 1)[-1]} {p.bpw:.2f}bpw", refresh=False)
                bar.update(1)
            hessians.clear()
        if inputs is not None and i + 1 < len(blocks):
            for j, (args, kwargs) in enumerate(inputs):  # in place: one batch's old and new states alive, not all
                inputs[j] = ((block_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs)
        if on_block_done is not None:
            on_block_done(i, packed)
    bar.close()
    return packed
