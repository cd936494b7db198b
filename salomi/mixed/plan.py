"""Mixed precision under a bit budget: turn a target bpw into a per-layer recipe.

    recipe = plan_recipe(reference, target_linear_bpw=1.6)          # linear bpw (what --bpw means)
    recipe = plan_recipe(reference, target_model_bpw=4.0)           # whole-file bpw (--model-bpw)
    api.quantize(..., recipe=recipe)

Linear bpw is stored bytes of the block linears x 8 / their weights, so the byte budget
is exact: floor(target x weights / 8), and every candidate's bytes are measured
(PackedLinear.nbytes, which depends only on the layer's shape and the method).

Model bpw is the whole file x 8 / the reference's parameters. The part of the file
that does not depend on the recipe (container preamble, floats, tokenizer, metadata)
is measured by actually saving the model with plain binary linears and subtracting
those linears' share; each linear's share of the file for a candidate is bounded
from above (its tensor bytes + alignment padding + its header entries with
maximum-width offsets/checksums + its metadata entries), and a small margin covers
metadata fields that api.quantize fills later (timings, commit). So the measured
model bpw of the quantized file lands at or a hair below the target.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salomi.errors import SalomiError
from salomi.loading.models import linear_names
from salomi.mixed.allocate import Allocation, allocate, byte_range
from salomi.mixed.sensitivity import (
    DEFAULT_CANDIDATES,
    EMBED_FLOAT,
    KL_SEG_LEN,
    KL_SEGMENTS,
    embedding_damage,
    sensitivity_table,
    table_costs,
)

# Bytes reserved for metadata api.quantize writes that we cannot know here (timings, model id,
# the --method label), for header space padding, and for the alignment of the tensors stored after the linears.
MARGIN_BYTES = 1024
MAX_OFFSET = 10**12 - 1
MAX_CRC = 2**32 - 1


@dataclass
class Plan:
    recipe: dict[str, str]
    target: str  # "linear" or "model"
    target_bpw: float
    budget_bytes: int  # for the linear bytes (linear target) or the linears' share of the file (model target)
    linear_bytes: int  # exact stored bytes of the chosen linears
    linear_weights: int
    predicted_linear_bpw: float
    predicted_model_bpw: float | None  # an upper bound (model target only)
    damage: float
    feasible_bpw: tuple[float, float]
    exact: bool
    seconds: float
    table_key: str
    histogram: dict[str, int] = field(default_factory=dict)
    embed: str | None = None  # how the embedding table is packed (None: float)
    embed_choices: dict[str, float] = field(default_factory=dict)  # --embed choice -> total predicted damage

    def summary(self) -> str:
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(self.histogram.items(), key=lambda kv: -kv[1]))
        extra = f", model bpw <= {self.predicted_model_bpw:.4f}" if self.predicted_model_bpw is not None else ""
        if self.embed_choices:
            extra += f", embedding {self.embed or EMBED_FLOAT} (" + ", ".join(
                f"{k}: {v:.4g}" for k, v in self.embed_choices.items()) + ")"
        return (f"{self.target} bpw target {self.target_bpw}: linear bpw {self.predicted_linear_bpw:.4f}{extra}, "
                f"predicted damage {self.damage:.4g}; {hist}")


def _json_len(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())


def file_share(name: str, shape: Sequence[int], entry: dict[str, Any], upper: bool) -> int:
    """Bytes of the file attributable to one packed linear: tensors, their header entries and
    the layer's two metadata entries. upper=True bounds it from above (max-width numbers and
    alignment padding), upper=False from below."""
    n = int(entry["bytes"])
    for t, dtype, tshape in entry["tensors"]:
        e = {"crc32": MAX_CRC if upper else 0, "dtype": dtype, "offsets": [MAX_OFFSET] * 2 if upper else [0, 0],
             "shape": list(tshape)}
        n += _json_len({f"q/{name}/{t}": e}) - 1  # "key":{...} plus one comma
        n += 7 if upper else 0
    layer = {"method": entry["method"], "format": entry["format"], "shape": list(shape), "params": entry["params"],
             "tensors": sorted(t for t, _, _ in entry["tensors"])}
    n += _json_len({name: layer}) - 1
    n += _json_len({name: entry["method"]}) - 1  # metadata["recipe"]["layers"]
    return n


def fixed_file_bytes(reference: Any, float_dtype: str = "float16", calib_info: dict[str, Any] | None = None,
                     embed: str | None = None) -> int:
    """Upper bound on the bytes of a quantized file that do not belong to the block linears,
    from an actual save (binary linears), minus a lower bound of those linears' share. With
    `embed`, the embedding table is packed as it will be (RTN on the same grid: same bytes)."""
    from salomi.api import _float_dtype
    from salomi.loading.models import linear_weight
    from salomi.mixed.sensitivity import layer_entry
    from salomi.packing.model_file import save_quantized
    from salomi.quantizers.spec import parse_method

    q = parse_method("binary")
    packed, lower = {}, 0
    for layer in linear_names(reference.model).values():
        for n, m in layer.items():
            p = q.quantize(linear_weight(m).float())
            packed[n] = p
            lower += file_share(n, p.shape, layer_entry(p), upper=False)
    meta = {
        "model": {"id": reference.name, "name": reference.name, "source": str(reference.source)},
        "recipe": {"label": "recipe(" + "x" * 24 + ")", "default": "x" * 24, "layers": {n: p.method for n, p in packed.items()}},
        "calibration": calib_info or {},
        "quantize": {"seconds": 99999.9, "peak_rss_mb": 999999, "seed": 0, "git_commit": "0123456-dirty",
                     "torch": torch.__version__},
    }
    embeddings = None
    if embed:
        from salomi.quantizers.base import PackedLinear
        from salomi.quantizers.embedding import parse_embed_method, quantize_embeddings, same_bytes_rtn

        eq = parse_embed_method(embed)
        embeddings = {n: PackedLinear(eq.spec, p.format, p.shape, p.tensors, p.params)
                      for n, p in quantize_embeddings(reference.model, same_bytes_rtn(embed), None).items()}
        meta["recipe"]["embeddings"] = eq.spec
    with tempfile.TemporaryDirectory() as d:
        size = save_quantized(Path(d) / "probe.salomi", reference.model, reference.tokenizer, packed, meta,
                              _float_dtype(float_dtype), embeddings)
    return size - lower + MARGIN_BYTES


def _embed_spec(choice: str | None) -> str | None:
    """The --embed method of one choice; None keeps the table float."""
    return None if choice in (None, EMBED_FLOAT) else choice


def _fmt_range(lo: float, hi: float) -> str:
    return f"{math.ceil(lo * 1e4) / 1e4:.4f}..{math.floor(hi * 1e4) / 1e4:.4f}"


def make_plan(
    reference: Any,
    target_linear_bpw: float | None = None,
    target_model_bpw: float | None = None,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    calib: str = "austen",
    segments: int = 128,
    seg_len: int = 512,
    seed: int = 0,
    float_dtype: str = "float16",
    damage: str = "kl",
    progress: bool = True,
    cache: bool = True,
    table: dict[str, Any] | None = None,
    embed: str | None = None,
) -> Plan:
    """Plan a per-layer recipe meeting exactly one of the two targets (see module doc).

    `embed` packs the embedding table; with --model-bpw it may list several choices
    ("none,gptq:3:g64+ls,gptq:4:g64+ls"; "none" keeps it float): each gets the linears' best
    allocation of what is left, and the one with the least total measured KL (the table's
    single-layer KLs + the table's own, embedding_damage) wins."""
    from salomi.loading.models import load_reference

    start = time.perf_counter()
    if (target_linear_bpw is None) == (target_model_bpw is None):
        raise SalomiError("give exactly one target: --bpw (linear bits/weight) or --model-bpw (whole file)")
    target = float(target_linear_bpw if target_linear_bpw is not None else target_model_bpw)  # type: ignore[arg-type]
    flag = "--bpw" if target_linear_bpw is not None else "--model-bpw"
    if not math.isfinite(target) or target <= 0:
        raise SalomiError(f"{flag} must be a positive number (got {target})")
    embeds: list[str | None] = [e.strip() for e in embed.split(",")] if embed else [None]
    if len(embeds) > 1 and target_model_bpw is None:
        raise SalomiError(f"--embed {embed!r}: several embedding choices need --model-bpw (the linear target "
                          f"does not count the table); give one, or use --model-bpw")
    if len(embeds) > 1 and damage != "kl":
        raise SalomiError(f"--embed {embed!r}: several embedding choices need --damage kl (the table's damage is "
                          f"a measured KL)")
    ref = load_reference(reference) if isinstance(reference, str) else reference
    if table is None:
        kl = (KL_SEGMENTS, KL_SEG_LEN) if damage == "kl" else (0, KL_SEG_LEN)
        table = sensitivity_table(ref, candidates, calib, segments, seg_len, seed, progress=progress, cache=cache,
                                  kl_segments=kl[0], kl_seg_len=kl[1])
    costs = table_costs(table, damage)
    layers = table["layers"]
    weights = sum(e["shape"][0] * e["shape"][1] for e in layers.values())
    cands = ", ".join(table["candidates"])
    chosen_embed = _embed_spec(embeds[0])
    embed_totals: dict[str, float] = {}
    if target_linear_bpw is not None:
        lo, hi = byte_range(costs)
        budget = math.floor(target * weights / 8)
        rng = (lo * 8 / weights, hi * 8 / weights)
        if not lo <= budget <= hi:
            raise SalomiError(f"--bpw {target}: unreachable with the candidates ({cands}); "
                              f"the feasible linear bpw range is {_fmt_range(*rng)}")
        alloc = allocate(costs, budget)
        model_bpw = None
    else:
        calib_info = {"text": calib, "segments": segments, "seg_len": seg_len, "seed": seed}
        params = sum(p.numel() for p in ref.model.parameters())
        share = {n: {c: (file_share(n, e["shape"], e["choices"][c], upper=True), d) for c, (_, d) in cs.items()}
                 for n, cs in costs.items() for e in [layers[n]]}
        lo, hi = byte_range(share)
        emb_kl = (embedding_damage(ref, [e for e in embeds if e], calib, segments, seg_len, seed, progress, cache)
                  if len(embeds) > 1 else {})
        best: tuple[float, Allocation, int, str | None] | None = None
        ranges = []
        for e in embeds:
            spec = _embed_spec(e)
            fixed = fixed_file_bytes(ref, float_dtype, calib_info, spec)
            budget = math.floor(target * params / 8) - fixed
            ranges.append(((fixed + lo) * 8 / params, (fixed + hi) * 8 / params))
            if budget < lo or (budget > hi and len(embeds) == 1):
                continue
            a = allocate(share, min(budget, hi))  # among several choices, one may leave bytes unspent
            total = a.damage + emb_kl.get(e, 0.0)  # "none" and a single choice cost 0 here
            if len(embeds) > 1:
                embed_totals[str(e)] = total
            if best is None or total < best[0]:
                best = (total, a, fixed, spec)
        rng = (min(r[0] for r in ranges), max(r[1] for r in ranges))
        if best is None or target > rng[1]:
            what = f"{float_dtype} embeddings/head" if embeds == [None] else f"--embed {embed}"
            raise SalomiError(f"--model-bpw {target}: unreachable with the candidates ({cands}) and {what}; "
                              f"the feasible model bpw range is {_fmt_range(*rng)}")
        _, a, fixed, chosen_embed = best
        lin = sum(costs[n][c][0] for n, c in a.choice.items())
        alloc = Allocation(a.choice, lin, a.damage, a.budget, a.exact)
        model_bpw = (fixed + a.bytes) * 8 / params
    recipe = dict(alloc.choice)
    plan = Plan(recipe=recipe, target="linear" if target_linear_bpw is not None else "model", target_bpw=target,
                budget_bytes=alloc.budget, linear_bytes=alloc.bytes, linear_weights=weights,
                predicted_linear_bpw=alloc.bytes * 8 / weights, predicted_model_bpw=model_bpw, damage=alloc.damage,
                feasible_bpw=rng, exact=alloc.exact, seconds=time.perf_counter() - start, table_key=table["key"],
                histogram=dict(Counter(recipe.values())), embed=chosen_embed, embed_choices=embed_totals)
    if progress:
        print(f"[salomi] plan: {plan.summary()}", file=sys.stderr)
    return plan


def plan_recipe(
    reference: Any,
    target_linear_bpw: float | None = None,
    target_model_bpw: float | None = None,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    calib: str = "austen",
    segments: int = 128,
    seg_len: int = 512,
    seed: int = 0,
    float_dtype: str = "float16",
    damage: str = "kl",
    progress: bool = True,
    cache: bool = True,
    embed: str | None = None,
) -> dict[str, str]:
    """Linear name -> method spec, for api.quantize(..., recipe=...). `reference` is a loaded
    salomi Reference or a model name/path. Give exactly one of the two targets."""
    return make_plan(reference, target_linear_bpw, target_model_bpw, candidates, calib, segments, seg_len, seed,
                     float_dtype, damage, progress, cache, embed=embed).recipe
