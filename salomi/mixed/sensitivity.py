"""Per-layer sensitivity table: for every quantized linear and every candidate method,
the exact stored bytes and a damage estimate.

Damage of quantizing linear W (with input Hessian H = 2/n sum x x^T over calibration
activations) to Q is the Hessian-weighted output error tr(dW H dW^T), dW = W - Q,
reported both raw ("error") and normalised by the layer's output energy tr(W H W^T)
("damage", what the allocator minimises by default). Hessians come from the float
model, block by block (one forward pass per block both accumulates the block's
Hessians and produces the next block's inputs), so the table does not depend on the
budget and is cached in <cache>/mixed/ for reuse across targets: one JSON file per
(model weights, calibration tokens), holding every candidate ever computed, so a new
candidate list only computes what is missing. The file is rewritten after each block,
so an interrupted run resumes where it stopped.

Bytes are what PackedLinear.nbytes says, i.e. exactly what the file stores for the
layer; a candidate whose size turns out to depend on the data (two layers of the same
shape with different sizes) is dropped with a warning, since the budget could not be
guaranteed when the layer is re-quantized with sequential Hessians.

With kl_segments > 0 every choice also gets "kl": the measured KL(reference || model) per
token on `kl_segments` held calibration segments (drawn with seed + 1, never the eval
text) when that layer alone is quantized with that candidate - the damage the issue
asks for, at one forward pass per (layer, candidate). The allocator then minimises the
sum of per-layer KLs (damage="kl"). The proxy above stays as the cheap default.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from salomi.errors import SalomiError
from salomi.loading.models import linear_names
from salomi.quantizers.base import PackedLinear, Quantizer

# What `--bpw` chooses from when no --candidates are given: the best set measured on the default model
# (docs/RESULTS.md, "budget-kl", session 18: k16/k32 took the 1.60 budget from 9.26 to 7.2-7.4; the 2-D
# codebooks at 2.5 and 3 bpw, between k256 and 3-bit GPTQ, took 2.10 from 2.94-3.01 to 2.86-2.91). Ordered
# by bits/weight; every spec must parse with salomi.quantizers.spec.parse_method.
DEFAULT_CANDIDATES: tuple[str, ...] = (
    "vq:d4:k16+ls+rot",
    "vq:d4:k32+ls+rot",
    "vq:d4:k64+ls+rot",
    "vq:d4:k128+ls+rot",
    "vq:d4:k256+ls+rot",
    "vq:d2:k32+ls+rot",
    "vq:d2:k64+ls+rot",
    "gptq:3:g64+rot",
    "gptq:4:g64+rot",
)

TABLE_VERSION = 1
DAMAGES = ("damage", "error", "kl")  # normalised proxy, raw proxy, measured single-layer KL
KL_SEGMENTS, KL_SEG_LEN = 4, 128  # what damage="kl" measures on (512 calibration tokens)


def canonical(candidates: Sequence[str]) -> list[str]:
    """Parse every spec (SalomiError on a bad one) and return the canonical specs, de-duplicated, in order."""
    from salomi.quantizers.spec import parse_method

    if not candidates:
        raise SalomiError("the candidate method list is empty; give at least one method")
    out: list[str] = []
    for c in candidates:
        s = parse_method(c).spec
        if s not in out:
            out.append(s)
    return out


@torch.no_grad()
def block_hessians(
    model: nn.Module, segments: torch.Tensor, batch: int = 8, skip: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, dict[str, tuple[nn.Module, torch.Tensor | None]]]]:
    """Yield (block index, {linear name: (module, H)}) for each block of the float model.

    H = 2/n * sum(x x^T) over the block's inputs from the float model (the same statistic
    quantize_sequential uses). One forward pass per block accumulates the Hessians and
    produces the next block's inputs. Blocks with skip(i) true are only run forward
    (H is None) - used to resume a cached table.
    """
    from salomi.calibration.sequential import accumulate_hessians, block_output, capture_block_inputs
    from salomi.loading.models import decoder_blocks

    blocks = decoder_blocks(model)
    names = linear_names(model)
    inputs = capture_block_inputs(model, blocks, segments, batch)
    for i, block in enumerate(blocks):
        layer = names[i]
        if skip and skip(i):
            outs = [block_output(block(*args, **kwargs)) for args, kwargs in inputs]
            hessians: dict[str, torch.Tensor] = {}
        else:
            with accumulate_hessians(layer) as hessians:
                outs = [block_output(block(*args, **kwargs)) for args, kwargs in inputs]
        yield i, {n: (m, hessians.get(n)) for n, m in layer.items()}
        inputs = [((o,) + tuple(args[1:]), kwargs) for o, (args, kwargs) in zip(outs, inputs)]


def output_error(weight: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) with dW = weight - q (float64 accumulation)."""
    d = (weight.float() - q.float().to(weight.device)).double()
    return float(((d @ hessian.double()) * d).sum())


def layer_entry(p: PackedLinear) -> dict[str, Any]:
    """What the file accounting needs to know about one packed layer, besides the error."""
    return {
        "bytes": p.nbytes,
        "method": p.method,
        "format": p.format,
        "params": p.params,
        "tensors": [[t, str(a.dtype), list(a.shape)] for t, a in sorted(p.tensors.items())],
    }


def measure(q: Quantizer, weight: torch.Tensor, hessian: torch.Tensor) -> tuple[PackedLinear, dict[str, Any]]:
    """Quantize one layer with q; return the packed layer and its table entry (bytes + error)."""
    p = q.quantize(weight, hessian.clone() if q.needs_hessian else None)
    e = layer_entry(p)
    e["error"] = output_error(weight, p.dequantize(), hessian)
    return p, e


def _fingerprint(model: nn.Module) -> str:
    """Hash of every block linear's weights: the table is only valid for these exact weights."""
    from salomi.loading.models import linear_weight

    h = hashlib.blake2b(digest_size=12)
    for layer in linear_names(model).values():
        for n, m in layer.items():
            w = linear_weight(m).float().contiguous()
            h.update(n.encode())
            h.update(str(tuple(w.shape)).encode())
            h.update(w.cpu().numpy().tobytes())
    return h.hexdigest()


def _table_path(key: str):  # noqa: ANN202
    from salomi.assets import cache_dir

    return cache_dir() / "mixed" / f"sens-{key}.json"


def _write_json(path, obj: dict[str, Any]) -> None:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    tmp.replace(path)


def _read_json(path) -> dict[str, Any] | None:  # noqa: ANN001
    """A cached table, or None if it is missing or unreadable (then it is rebuilt)."""
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None


def calibration_tokens(tokenizer: Any, calib: str, segments: int, seg_len: int, seed: int) -> torch.Tensor:
    """The calibration segments exactly as api.quantize draws them."""
    from salomi.api import _text_ids
    from salomi.calibration.data import calibration_segments

    if segments < 1 or seg_len < 2:
        raise SalomiError(f"calibration needs segments >= 1 and seg_len >= 2 (got {segments} x {seg_len})")
    torch.manual_seed(seed)
    return calibration_segments(_text_ids(tokenizer, calib), segments, seg_len, seed, calib)


def sensitivity_table(
    reference: Any,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    calib: str = "austen",
    segments: int = 128,
    seg_len: int = 512,
    seed: int = 0,
    progress: bool = True,
    cache: bool = True,
    batch: int = 8,
    kl_segments: int = 0,
    kl_seg_len: int = 128,
) -> dict[str, Any]:
    """Bytes and damage of every candidate on every block linear of `reference`.

    Returns {"key", "candidates", "info", "layers": {name: {"shape": [o, i], "norm": tr(W H W^T),
    "choices": {spec: {"bytes", "error", "damage", "method", "format", "params", "tensors"}}}}},
    layers in model order. A candidate that cannot take a layer's shape is absent from that
    layer's choices.
    """
    from salomi.loading.models import linear_weight
    from salomi.progress import bar as progress_bar
    from salomi.quantizers.spec import parse_method

    model = reference.model
    cands = canonical(candidates)
    quantizers = {c: parse_method(c) for c in cands}
    segs = calibration_tokens(reference.tokenizer, calib, segments, seg_len, seed)
    info = {"model": str(reference.source), "weights": _fingerprint(model), "calib": calib, "segments": segments,
            "seg_len": seg_len, "seed": seed,
            "tokens": hashlib.blake2b(segs.numpy().tobytes(), digest_size=12).hexdigest(), "version": TABLE_VERSION}
    key = hashlib.sha256(json.dumps({k: v for k, v in info.items() if k != "model"}, sort_keys=True).encode())
    key_s = key.hexdigest()[:24]
    path = _table_path(key_s)
    stored: dict[str, Any] = {"info": info, "layers": {}}
    cached = _read_json(path) if cache else None
    if cached is not None and cached.get("info", {}).get("weights") == info["weights"]:
        stored = cached
    names = linear_names(model)
    need_kl = kl_segments > 0
    kl_probe = None
    if need_kl:
        kl_segs = calibration_tokens(reference.tokenizer, calib, kl_segments, kl_seg_len, seed + 1)
        kl_key = hashlib.blake2b(kl_segs.numpy().tobytes(), digest_size=12).hexdigest()
        if stored.get("kl_tokens") != kl_key:  # KLs measured on other segments are not comparable
            for e in stored["layers"].values():
                for ch in e.get("choices", {}).values():
                    ch.pop("kl", None)
            stored["kl_tokens"] = kl_key

    def missing(n: str) -> list[str]:
        e = stored["layers"].get(n, {})
        have = e.get("choices", {})
        return [c for c in cands if c not in e.get("unfit", []) and (c not in have or (need_kl and "kl" not in have[c]))]

    todo = {i: {n: missing(n) for n in layer} for i, layer in names.items()}
    total = sum(len(v) for layer in todo.values() for v in layer.values())
    if total:
        if need_kl:  # only when something is measured: its reference logits and block inputs are ~150 MB
            kl_probe = KLProbe(model, kl_segs)
        bar = progress_bar(total, "sensitivity", "fit", disable=not progress)
        last = max(i for i, layer in todo.items() if any(layer.values()))
        for i, layer in block_hessians(model, segs, batch, skip=lambda i: not any(todo[i].values())):
            for n, (m, h) in layer.items():
                if not todo[i][n]:
                    continue
                w = linear_weight(m).float()
                entry = stored["layers"].setdefault(n, {"shape": list(w.shape), "choices": {}, "unfit": []})
                entry["norm"] = float(((w.double() @ h.double()) * w.double()).sum())
                for c in todo[i][n]:
                    q = quantizers[c]
                    if not _fits(q, tuple(w.shape)):
                        entry["unfit"].append(c)
                    else:
                        p, e = measure(q, w, h)
                        if kl_probe is not None:
                            e["kl"] = kl_probe.kl_with(m, p.dequantize(), block=i)
                        entry["choices"][c] = e
                    bar.set_postfix_str(f"{n.rsplit('.', 2)[-2]}.{n.rsplit('.', 1)[-1]} {c}")
                    bar.update(1)
            if cache:
                _write_json(path, stored)
            if i >= last:
                break
        bar.close()
    return _select(stored, names, cands, key_s, info, need_kl=need_kl)


EMBED_FLOAT = "none"  # the --embed choice that leaves the table in the file's float dtype


def embedding_damage(
    reference: Any,
    specs: Sequence[str],
    calib: str = "austen",
    segments: int = 16,
    seg_len: int = 512,
    seed: int = 0,
    progress: bool = True,
    cache: bool = True,
    kl_segments: int = KL_SEGMENTS,
    kl_seg_len: int = KL_SEG_LEN,
) -> dict[str, float]:
    """{spec: measured KL(reference || model) per token when only the embedding table (and the head
    tied to it, or its own packed head) is quantized with spec}; "none" costs 0. Measured on the same
    held segments as the per-layer KLs of the sensitivity table, so the two add up in one budget;
    cached beside it (keyed by the same weights and calibration tokens)."""
    from salomi.quantizers.embedding import parse_embed_method, quantize_embeddings

    model = reference.model
    segs = calibration_tokens(reference.tokenizer, calib, segments, seg_len, seed)
    kl_segs = calibration_tokens(reference.tokenizer, calib, kl_segments, kl_seg_len, seed + 1)
    info = {"weights": _fingerprint(model), "emb": hashlib.blake2b(
        model.get_input_embeddings().weight.detach().float().cpu().numpy().tobytes(), digest_size=12).hexdigest(),
        "tokens": hashlib.blake2b(segs.numpy().tobytes(), digest_size=12).hexdigest(),
        "kl_tokens": hashlib.blake2b(kl_segs.numpy().tobytes(), digest_size=12).hexdigest(), "version": TABLE_VERSION}
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:24]
    path = _table_path(f"embed-{key}")
    stored: dict[str, Any] = (_read_json(path) if cache else None) or {"info": info, "kl": {}}
    out: dict[str, float] = {}
    probe = None
    for spec in specs:
        if spec == EMBED_FLOAT:
            out[spec] = 0.0
            continue
        q = parse_embed_method(spec)
        if q.spec not in stored["kl"]:
            if probe is None:
                probe = KLProbe(model, kl_segs)
            if progress:
                print(f"[salomi] embedding damage: {q.spec}", file=sys.stderr)
            packed = quantize_embeddings(model, q, segs if q.needs_hessian else None)
            swaps = [(model.get_submodule(n), p.dequantize()) for n, p in packed.items()]
            stored["kl"][q.spec] = probe.kl_with_all(swaps, block=0)
            if cache:
                _write_json(path, stored)
        out[spec] = float(stored["kl"][q.spec])
    return out


class KLProbe:
    """KL(reference || model) per token on fixed segments with one linear's weight swapped.

    The float model's input to every block is kept, so a probe of a linear in block i runs
    only blocks i.. and the head: blocks before i are replaced for the call by stand-ins that
    hand block i its kept input (the same numbers the full pass computes, at about half the
    cost on average)."""

    def __init__(self, model: nn.Module, segments: torch.Tensor, batch: int = 8) -> None:
        import torch.nn.functional as F

        from salomi.loading.models import decoder_blocks

        self.model, self.segs, self.batch = model, segments, batch
        self.blocks = decoder_blocks(model)
        self.block_inputs: list[list[torch.Tensor]] = [[] for _ in self.blocks]  # [block][batch]
        self.tuple_out = False

        def keep(i: int):  # noqa: ANN202
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                h = args[0] if args else kwargs["hidden_states"]
                self.block_inputs[i].append(h.detach().clone())
            return hook

        def out_type(_m: nn.Module, _a: tuple, out: Any) -> None:
            self.tuple_out = isinstance(out, tuple | list)

        hooks = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        hooks.append(self.blocks[0].register_forward_hook(out_type))
        try:
            with torch.no_grad():
                self.ref_logp = [F.log_softmax(self._logits(i), -1) for i in range(0, len(segments), batch)]
                self.ref_p = [lp.exp() for lp in self.ref_logp]  # the same values every probe would recompute
        finally:
            for h in hooks:
                h.remove()

    def _logits(self, i: int) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        ids = self.segs[i : i + self.batch].to(dev)
        return self.model(ids, use_cache=False).logits.float().flatten(0, -2)

    @torch.no_grad()
    def kl_with(self, module: nn.Module, weight: torch.Tensor, block: int = 0) -> float:
        """KL with `module` (a linear of block `block`) holding `weight`."""
        return self.kl_with_all([(module, weight)], block)

    @torch.no_grad()
    def kl_with_all(self, swaps: list[tuple[nn.Module, torch.Tensor]], block: int = 0) -> float:
        """KL with each (module, weight) of `swaps` swapped in at once (modules of block `block`
        or later; block 0 also covers the embedding table and the head)."""
        import torch.nn.functional as F

        from salomi.calibration.sequential import _set_weight
        from salomi.loading.models import linear_weight

        origs = [linear_weight(m).detach().clone() for m, _ in swaps]
        kept = [self.blocks[j] for j in range(block)]
        stand_in = _Replay(self.block_inputs[block], self.tuple_out) if block > 0 else None
        for (m, w), orig in zip(swaps, origs, strict=True):
            _set_weight(m, w.to(orig.device, orig.dtype))
        for j in range(block):
            self.blocks[j] = stand_in if j == 0 else _PassThrough(self.tuple_out)
        try:
            total, n = 0.0, 0
            for j, i in enumerate(range(0, len(self.segs), self.batch)):
                if stand_in is not None:
                    stand_in.batch = j
                rl = self.ref_logp[j]
                lq = F.log_softmax(self._logits(i), -1)
                total += float((self.ref_p[j] * (rl - lq)).sum())
                n += rl.shape[0]
        finally:
            for j, b in enumerate(kept):
                self.blocks[j] = b
            for (m, _), orig in zip(swaps, origs, strict=True):
                _set_weight(m, orig)
        return max(total / n, 0.0)


class _Replay(nn.Module):
    """Stands in for block 0: returns the kept input of the probed block for the current batch."""

    def __init__(self, inputs: list[torch.Tensor], tuple_out: bool) -> None:
        super().__init__()
        self.inputs, self.tuple_out, self.batch = inputs, tuple_out, 0

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        h = self.inputs[self.batch]
        return (h,) if self.tuple_out else h


class _PassThrough(nn.Module):
    """Stands in for a block between block 0 and the probed one: hands its input on."""

    def __init__(self, tuple_out: bool) -> None:
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
        return (hidden_states,) if self.tuple_out else hidden_states


def _fits(q: Quantizer, shape: tuple[int, int]) -> bool:
    try:
        q.check_shape(shape)
    except SalomiError:
        return False
    return True


def _select(stored: dict[str, Any], names: dict[int, dict[str, nn.Module]], cands: list[str], key: str,
            info: dict[str, Any], need_kl: bool = False) -> dict[str, Any]:
    """The table restricted to `cands`, with normalised damage, and data-dependent sizes dropped."""
    layers: dict[str, Any] = {}
    for layer in names.values():
        for n in layer:
            e = stored["layers"][n]
            norm = e.get("norm") or 0.0
            choices = {}
            for c in cands:
                if c in e["choices"] and (not need_kl or "kl" in e["choices"][c]):
                    ch = dict(e["choices"][c])
                    ch["damage"] = ch["error"] / norm if norm > 0 else ch["error"]
                    choices[c] = ch
            layers[n] = {"shape": e["shape"], "norm": norm, "choices": choices}
    sizes: dict[tuple[str, tuple[int, ...]], set[int]] = {}
    for e in layers.values():
        for c, ch in e["choices"].items():
            sizes.setdefault((c, tuple(e["shape"])), set()).add(ch["bytes"])
    variable = sorted({c for (c, _), s in sizes.items() if len(s) > 1})
    for c in variable:
        print(f"[salomi] candidate {c}: stored size depends on the data, not only the shape; dropped "
              "(its bytes could change when re-quantized)", file=sys.stderr)
        for e in layers.values():
            e["choices"].pop(c, None)
    for n, e in layers.items():
        if not e["choices"]:
            raise SalomiError(f"no candidate method can quantize {n} (shape {e['shape'][0]}x{e['shape'][1]}); "
                              f"add one that fits, e.g. binary")
    return {"key": key, "candidates": cands, "info": info, "layers": layers}


def table_costs(table: dict[str, Any], damage: str = "damage") -> dict[str, dict[str, tuple[int, float]]]:
    """{layer: {spec: (bytes, damage)}} for the allocator. damage="error" uses the raw tr(dW H dW^T),
    "kl" the measured single-layer KL (a table made with kl_segments > 0)."""
    if damage not in DAMAGES:
        raise SalomiError(f"damage must be one of {', '.join(DAMAGES)} (got {damage!r})")
    if damage == "kl" and any("kl" not in ch for e in table["layers"].values() for ch in e["choices"].values()):
        raise SalomiError("this sensitivity table has no measured KL; build it with kl_segments > 0")
    return {n: {c: (int(ch["bytes"]), float(ch[damage])) for c, ch in e["choices"].items()}
            for n, e in table["layers"].items()}


@torch.no_grad()
def validate_proxy(
    reference: Any,
    layers: Sequence[str],
    methods: Sequence[str],
    calib: str = "austen",
    segments: int = 16,
    seg_len: int = 256,
    seed: int = 0,
    eval_text: str = "brown",
    eval_windows: int = 4,
    eval_seq_len: int = 256,
) -> dict[str, Any]:
    """Check the damage proxy against the true KL(reference || model) increase when one layer
    alone is quantized. Returns {"rows": [{"layer", "method", "damage", "error", "kl"}],
    "spearman_damage", "spearman_error"} (rank correlations of each proxy with KL)."""
    from salomi.api import _text_ids
    from salomi.evaluation.evaluate import make_windows
    from salomi.loading.models import linear_weight
    from salomi.quantizers.spec import parse_method

    model = reference.model
    segs = calibration_tokens(reference.tokenizer, calib, segments, seg_len, seed)
    probe = KLProbe(model, make_windows(_text_ids(reference.tokenizer, eval_text), eval_seq_len, eval_windows,
                                        eval_text))
    want = set(layers)
    hs: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    for _, layer in block_hessians(model, segs):
        hs.update({n: v for n, v in layer.items() if n in want})
        if want <= set(hs):
            break
    rows = []
    for n in layers:
        m, h = hs[n]
        w = linear_weight(m).float().clone()
        norm = float(((w.double() @ h.double()) * w.double()).sum())
        for spec in methods:
            q = parse_method(spec)
            p, e = measure(q, w, h)
            rows.append({"layer": n, "method": q.spec, "damage": e["error"] / norm if norm > 0 else e["error"],
                         "error": e["error"], "kl": probe.kl_with(m, p.dequantize())})
    return {"rows": rows, "spearman_damage": spearman([r["damage"] for r in rows], [r["kl"] for r in rows]),
            "spearman_error": spearman([r["error"] for r in rows], [r["kl"] for r in rows])}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 2:
        return float("nan")

    def ranks(x: Sequence[float]) -> torch.Tensor:
        t = torch.tensor(list(x), dtype=torch.float64)
        r = torch.empty_like(t)
        r[torch.argsort(t)] = torch.arange(len(t), dtype=torch.float64)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / den if den > 0 else float("nan")
