"""Distillation that recovers quality at the same bit rate: block by block, then end to end.

Starting from a packed file, every quantized linear becomes a TrainableLinear (see
trainable.py: what each storage format lets us train). Two stages follow, on
calibration text (Austen by default; never the evaluation text):

1. block stage: for each block b in order, `block_steps` Adam steps on the block's
   trainable values, minimising the MSE between the block's output on the quantized
   model's own activations (blocks < b already recovered) and the reference's output
   of block b on the reference's activations, normalised by the target's mean square.
   At the end of a block its values are snapped to fp16 and the calibration
   activations are pushed through it for the next block.
2. end-to-end stage: `steps` Adam steps on all trainable values at once, minimising
   KL(reference || quantized) of the next-token distribution per token. The
   reference's log-probs are computed per batch (no logits are stored). A packed
   embedding table (and the head tied to it) trains here too, unless train_embed=False.

Everything is a function of (seed, global step): the calibration segments, the batch
order (a fresh permutation of the segments per stage and epoch) and the optimizer.
A checkpoint (OUT.ckpt, atomic temp + os.replace) holds the trainable values, the
optimizer state of the current stage, the loss history, RNG state and data position;
`resume=True` continues from it and reproduces the loss curve of an uninterrupted
run with the same settings. `budget_minutes` stops cleanly after the step that crosses
the budget (checkpoint + result written). The result is repacked into the same formats
at the same bpw (repack.py) and, optionally, evaluated before/after on held-out text.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from salomi.calibration.sequential import block_output, capture_block_inputs
from salomi.errors import SalomiError
from salomi.recovery.trainable import (
    TrainableEmbedding,
    TrainableLinear,
    View,
    describe_views,
    make_view,
    reused_weights,
)

CKPT_VERSION = 1
# The end-to-end stage keeps the reference's last hidden states per calibration segment (the
# reference body then runs once per segment, not once per step) while they take at most this:
# 512 x 256 tokens of SmolLM2 (576 wide, float32) are 302 MB.
REF_CACHE_BYTES = 1 << 30
# Settings that must match for --resume (steps may grow: the schedule is extension-safe).
RESUME_KEYS = ("block_steps", "lr", "block_lr", "code_lr", "code_flip", "train_codes", "train_embed", "calib", "segments",
               "seg_len", "batch", "seed", "body_dtype")


# ---------------------------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_texts(calib: str, eval_text: str) -> None:
    """Never calibrate on the evaluation text."""

    def norm(t: str) -> str:
        p = Path(t)
        return str(p.resolve()) if p.exists() else t.lower()

    c, e = norm(calib), norm(eval_text)
    overlap = c == e or (c.startswith("brown") and e.startswith("brown") and "brown" in (c, e))
    if overlap:
        raise SalomiError(f"calibration text {calib!r} overlaps the evaluation text {eval_text!r}; "
                          f"recover on another text (default: austen) or evaluate on another")


def batch_indices(n: int, batch: int, seed: int, stage: int, step: int) -> torch.Tensor:
    """Segments of the `step`-th batch of a stage: a fixed permutation of the n segments per
    (seed, stage, epoch), cut into n // batch batches. Stateless, so any step can be resumed."""
    per_epoch = n // batch
    epoch, j = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(((seed * 4099 + stage) << 24) + epoch)
    return torch.randperm(n, generator=g)[j * batch : (j + 1) * batch]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class BlockCall:
    """How a decoder block is called in this model: the captured extra args/kwargs with the
    hidden states swapped for the ones given (the same for every batch of `batch` segments)."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        if args:
            self.args, self.kwargs, self.key = tuple(args[1:]), dict(kwargs), None
        else:
            self.args, self.kwargs, self.key = (), dict(kwargs), "hidden_states"
        for k in ("past_key_value", "past_key_values", "layer_past"):
            if k in self.kwargs:
                self.kwargs[k] = None
        self.kwargs["use_cache"] = False if "use_cache" in self.kwargs else self.kwargs.get("use_cache", False)
        if "use_cache" not in kwargs:
            self.kwargs.pop("use_cache")

    def __call__(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.key is None:
            return block_output(block(h, *self.args, **self.kwargs))
        return block_output(block(*self.args, **{**self.kwargs, self.key: h}))


@torch.no_grad()
def capture_block0(model: nn.Module, blocks: nn.ModuleList, segs: torch.Tensor, batch: int,
                   device: torch.device) -> tuple[torch.Tensor, BlockCall]:
    """The hidden states every segment brings to block 0 [N, T, d], and how blocks are called."""
    captured = capture_block_inputs(model, blocks, segs.to(device), batch)
    hs = [(args[0] if args else kwargs["hidden_states"]).detach() for args, kwargs in captured]
    return torch.cat(hs), BlockCall(*captured[0])


@torch.no_grad()
def _run_block(block: nn.Module, call: BlockCall, h: torch.Tensor, batch: int) -> torch.Tensor:
    with reused_weights(block):
        return torch.cat([call(block, h[i : i + batch]) for i in range(0, len(h), batch)])


@torch.no_grad()
def calib_kl(model: nn.Module, ref: nn.Module, segs: torch.Tensor, batch: int, device: torch.device) -> float:
    """Mean KL(reference || model) per token of the next-token distribution on `segs`."""
    total, n = 0.0, 0
    with reused_weights(model):
        for i in range(0, len(segs), batch):
            ids = segs[i : i + batch].to(device)
            total += float(kl_loss(model, ref, ids)) * ids.numel()
            n += ids.numel()
    return total / max(n, 1)


def _kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    logq = F.log_softmax(logits.float(), dim=-1).flatten(0, -2)
    logp = F.log_softmax(ref_logits.float(), dim=-1).flatten(0, -2)
    return (logp.exp() * (logp - logq)).sum() / logq.shape[0]


BODY_DTYPES = ("float32", "bfloat16")


def _autocast(device: torch.device, body_dtype: str) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=body_dtype == "bfloat16")


def _plain_head(model: nn.Module) -> nn.Module | None:
    """The output head if logits = head(last hidden state) exactly (no soft-capping or logit
    scaling in the causal-LM wrapper), else None."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(model, "base_model", model) is model:
        return None
    return head


def _kl_chunk(h: torch.Tensor, ref_logits_fn: Any, head: Any, lo: int, hi: int) -> torch.Tensor:
    return _kl(head(h[lo:hi]), ref_logits_fn(lo, hi)) * (hi - lo)


def kl_loss(model: nn.Module, ref: nn.Module, ids: torch.Tensor, chunk: int = 256,
            ref_hidden: torch.Tensor | None = None, body_dtype: str = "float32") -> torch.Tensor:
    """Mean KL(reference || model) per token, with the logits made `chunk` tokens at a time:
    [tokens, vocab] tensors (about 8 of them between both softmaxes and the backward) are
    what dominates the end-to-end stage's memory, so each chunk's logits are recomputed in
    backward instead of kept. Same value as _kl on the full logits (pinned by a test).
    ref_hidden: the reference's last hidden states for ids, if already known (plain heads only).
    body_dtype "bfloat16": the trained model's body runs under bf16 autocast (its matmuls ~1.5-2x faster on
    CPUs with bf16 dot products); the head, both softmaxes and the reference stay float32."""
    head, ref_head = _plain_head(model), _plain_head(ref)
    if head is None or ref_head is None:
        with torch.no_grad():
            ref_logits = ref(ids, use_cache=False).logits
        with _autocast(ids.device, body_dtype):
            logits = model(ids, use_cache=False).logits
        return _kl(logits, ref_logits)
    from torch.utils.checkpoint import checkpoint

    if ref_hidden is not None:
        hr = ref_hidden.flatten(0, -2)
    else:
        with torch.no_grad():
            hr = ref.base_model(ids, use_cache=False)[0].flatten(0, -2)
    with _autocast(ids.device, body_dtype):
        h = model.base_model(ids, use_cache=False)[0].flatten(0, -2)
    h = h.float()

    def ref_logits(lo: int, hi: int) -> torch.Tensor:
        with torch.no_grad():
            return ref_head(hr[lo:hi])

    if isinstance(head, TrainableLinear):  # a trained (tied) head: its weight built once per step, not per chunk
        head = head.fixed_weight()
    n = h.shape[0]
    total = h.new_zeros(())
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        if h.requires_grad:
            total = total + checkpoint(_kl_chunk, h, ref_logits, head, lo, hi, use_reentrant=False)
        else:
            total = total + _kl_chunk(h, ref_logits, head, lo, hi)
    return total / n


@torch.no_grad()
def sync_buffers(model: nn.Module, ref: nn.Module) -> int:
    """Copy the reference's non-parameter state (rotary inv_freq / original_inv_freq, causal
    masks) into the model built from the file: same architecture and config, so the values
    must agree, and this keeps training correct even if a file loader leaves them unset.
    Returns how many tensors differed."""
    changed = 0
    ref_bufs = dict(ref.named_buffers())
    for name, buf in list(model.named_buffers()):
        src = ref_bufs.get(name)
        if src is not None and src.shape == buf.shape:
            if not torch.equal(buf.cpu(), src.cpu()):
                changed += 1
            buf.copy_(src.to(buf.device, buf.dtype))
    ref_mods = dict(ref.named_modules())
    for name, mod in model.named_modules():
        rm = ref_mods.get(name)
        if rm is None:
            continue
        for attr in ("original_inv_freq",):
            a, b = getattr(mod, attr, None), getattr(rm, attr, None)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                changed += int(not torch.equal(a.cpu(), b.cpu()))
                setattr(mod, attr, b.detach().clone().to(a.device))
    return changed


# ---------------------------------------------------------------------------------------------- the run


class Recovery:
    """The state of one recovery run (models, views, schedule); see run_recover."""

    def __init__(self, qf: Any, ref: Any, segs: torch.Tensor, cfg: dict[str, Any], device: torch.device) -> None:
        from salomi.loading.models import decoder_blocks
        from salomi.packing.model_file import _set_module, build_model
        from salomi.runtime.qlinear import QuantLinear

        self.qf, self.ref, self.segs, self.cfg, self.device = qf, ref, segs, cfg, device
        self.model = build_model(qf, "dequant", device)
        sync_buffers(self.model, ref.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.views: dict[str, TrainableLinear] = {}
        for name, packed in qf.packed.items():
            old = self.model.get_submodule(name)
            if not isinstance(old, QuantLinear):
                raise SalomiError(f"{qf.path}: layer {name} did not load as a quantized linear")
            mod = TrainableLinear(packed, old.bias, cfg["train_codes"], cfg["code_flip"]).to(device)
            _set_module(self.model, name, mod)
            self.views[name] = mod
        self.embed_views: dict[str, View] = {}  # packed embedding tables (a tied head shares the input's)
        if qf.embeddings and cfg["train_embed"]:
            self._train_embeddings()
        self.blocks = decoder_blocks(self.model)
        self.ref_blocks = decoder_blocks(ref.model)
        prefix = next(n for n, m in self.model.named_modules() if m is self.blocks)
        self.block_views = [[n for n in self.views if n.startswith(f"{prefix}.{i}.")] for i in range(len(self.blocks))]
        self.n_blocks = len(self.blocks)
        self.total = self.n_blocks * cfg["block_steps"] + cfg["steps"]
        self.acts: dict[str, Any] | None = None  # block-stage activations, for block acts["block"]
        self._ref_h: dict[int, torch.Tensor] = {}  # segment -> the reference's last hidden states (ref_hidden)

    def _train_embeddings(self) -> None:
        """Swap the packed input table (and the head, tied or with its own packed table) for
        modules that compute them from trainable views."""
        from salomi.packing.model_file import _set_module
        from salomi.runtime.qlinear import QuantLinear

        names = {m: n for n, m in self.model.named_modules()}
        for name, packed in self.qf.embeddings.items():
            self.embed_views[name] = make_view(packed, self.cfg["train_codes"]).to(self.device)
        inp_name = names[self.model.get_input_embeddings()]
        if inp_name not in self.embed_views:
            raise SalomiError(f"{self.qf.path}: packed embeddings {sorted(self.embed_views)} do not match this model")
        _set_module(self.model, inp_name, TrainableEmbedding(self.embed_views[inp_name]))
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if isinstance(head, QuantLinear):
            head_name = names[head]
            view = self.embed_views.get(head_name, self.embed_views[inp_name])  # tied: the input's table
            _set_module(self.model, head_name, TrainableLinear(view.p, head.bias, view=view).to(self.device))

    def trained_views(self, kind: str, b: int) -> list[View]:
        """The views a stage trains: block b's linears, or every linear and packed embedding table."""
        if kind == "block":
            return [self.views[n].view for n in self.block_views[b]]
        return [m.view for m in self.views.values()] + list(self.embed_views.values())

    # -- schedule
    def stage_of(self, g: int) -> tuple[str, int, int]:
        bs = self.cfg["block_steps"]
        if g < self.n_blocks * bs:
            return "block", g // bs, g % bs
        return "e2e", -1, g - self.n_blocks * bs

    def stage_len(self, kind: str) -> int:
        return self.cfg["block_steps"] if kind == "block" else self.cfg["steps"]

    def params(self, kind: str, b: int) -> list[dict[str, Any]]:
        views = self.trained_views(kind, b)
        cont = [c.delta for v in views for c in v.conts()]
        codes = [p for v in views for p in v.code_params()]
        lr = self.cfg["block_lr"] if kind == "block" else self.cfg["lr"]
        groups = [{"params": cont, "lr": lr}]
        if codes:
            groups.append({"params": codes, "lr": self.cfg["code_lr"]})
        return [g for g in groups if g["params"]]

    def update_codes(self, kind: str, b: int) -> int:
        return sum(v.update_codes() for v in self.trained_views(kind, b))

    def optimizer(self, kind: str, b: int) -> torch.optim.Optimizer | None:
        groups = self.params(kind, b)
        return torch.optim.Adam(groups) if groups else None

    # -- block stage activations
    def prepare_block(self, b: int) -> None:
        """Make self.acts hold block b's inputs (quantized path) and targets (reference path)."""
        batch = self.cfg["batch"]
        if self.acts is None or self.acts["block"] != b:
            qh, qcall = capture_block0(self.model, self.blocks, self.segs, batch, self.device)
            rh, rcall = capture_block0(self.ref.model, self.ref_blocks, self.segs, batch, self.device)
            for i in range(b):  # blocks before b are final: push the activations through them
                qh = _run_block(self.blocks[i], qcall, qh, batch)
                rh = _run_block(self.ref_blocks[i], rcall, rh, batch)
            self.acts = {"block": b, "q": qh, "r": rh, "qcall": qcall, "rcall": rcall}
        a = self.acts
        a["target"] = _run_block(self.ref_blocks[b], a["rcall"], a["r"], batch)
        a["power"] = float(a["target"].pow(2).mean().clamp(min=1e-30))

    @torch.no_grad()
    def finish_block(self, b: int) -> None:
        for n in self.block_views[b]:
            self.views[n].view.snap_()
        a = self.acts
        if a is None:
            return
        if b + 1 < self.n_blocks:
            a["q"] = _run_block(self.blocks[b], a["qcall"], a["q"], self.cfg["batch"])
            a["r"] = a.pop("target")
            a["block"] = b + 1
        else:
            self.acts = None

    # -- steps
    def loss(self, kind: str, b: int, s: int) -> torch.Tensor:
        cfg = self.cfg
        n = len(self.segs)
        stage_id = b if kind == "block" else self.n_blocks
        idx = batch_indices(n, cfg["batch"], cfg["seed"], stage_id, s)
        if kind == "block":
            a = self.acts
            out = a["qcall"](self.blocks[b], a["q"][idx.to(a["q"].device)])
            return F.mse_loss(out, a["target"][idx.to(out.device)]) / a["power"]
        return kl_loss(self.model, self.ref.model, self.segs[idx].to(self.device), ref_hidden=self.ref_hidden(idx),
                       body_dtype=cfg["body_dtype"])

    @torch.no_grad()
    def ref_hidden(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The reference's last hidden states for segments idx, each computed once (alone, so
        the values do not depend on which batch first asked: a resumed run gets the same) and
        kept while they fit in REF_CACHE_BYTES; None where the head is not plain (no cache)."""
        if _plain_head(self.model) is None or _plain_head(self.ref.model) is None:
            return None
        head = self.ref.model.get_output_embeddings().weight
        if len(self.segs) * self.segs.shape[1] * head.shape[1] * head.element_size() > REF_CACHE_BYTES:
            return None
        for i in idx.tolist():
            if i not in self._ref_h:
                self._ref_h[i] = self.ref.model.base_model(self.segs[i : i + 1].to(self.device), use_cache=False)[0][0]
        return torch.stack([self._ref_h[i] for i in idx.tolist()])

    def _all_views(self) -> dict[str, View]:
        return {**{n: m.view for n, m in self.views.items()}, **{f"embeddings/{n}": v for n, v in self.embed_views.items()}}

    def state(self) -> dict[str, Any]:
        return {n: {k: t.detach().cpu() for k, t in v.state_dict().items()} for n, v in self._all_views().items()}

    def load_state(self, st: dict[str, Any]) -> None:
        views = self._all_views()
        if set(st) != set(views):
            raise SalomiError("checkpoint holds other layers than this file")
        for n, v in views.items():
            v.load_state_dict({k: t.to(self.device) for k, t in st[n].items()})


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def recovery_config(
    *,
    steps: int = 100,
    block_steps: int = 20,
    lr: float = 1e-3,
    block_lr: float = 2e-3,
    code_lr: float = 5e-3,
    code_flip: float = 0.0,
    train_codes: bool = False,
    train_embed: bool = True,
    calib: str = "austen",
    segments: int = 64,
    seg_len: int = 256,
    batch: int = 4,
    seed: int = 0,
    body_dtype: str = "float32",
) -> dict[str, Any]:
    """The settings of a recovery run (run_recover's **settings), checked; segments rounded down to whole batches.

    steps: end-to-end (KL) steps; block_steps: steps per block in the block stage before it.
    train_codes: also train the discrete codes by straight-through rounding; VQ codes only if
    code_flip > 0 (latent vectors, at most `code_flip` of a layer's codes moved per step).
    train_embed: a packed embedding table (and the head tied to it) trains in the end-to-end stage
    like a linear of its format; False keeps its bytes.
    body_dtype: "bfloat16" runs the end-to-end stage's model body under bf16 autocast (kl_loss); the
    trained values, the optimizer, the head and the reference stay float32."""
    for name, v in (("steps", steps), ("block_steps", block_steps)):
        if v < 0:
            raise SalomiError(f"{name} must be >= 0 (got {v})")
    if batch < 1 or segments < batch:
        raise SalomiError(f"need segments >= batch >= 1 (got segments={segments}, batch={batch})")
    if not 0 <= code_flip <= 1:
        raise SalomiError(f"--code-flip is a share of a layer's codes per step, in [0, 1] (got {code_flip})")
    if body_dtype not in BODY_DTYPES:
        raise SalomiError(f"--body-dtype must be one of {', '.join(BODY_DTYPES)} (got {body_dtype!r})")
    return {"steps": steps, "block_steps": block_steps, "lr": lr, "block_lr": block_lr, "code_lr": code_lr,
            "code_flip": code_flip, "train_codes": bool(train_codes), "train_embed": bool(train_embed), "calib": calib,
            "segments": segments - segments % batch, "seg_len": seg_len, "batch": batch, "seed": seed,
            "body_dtype": body_dtype}


def run_recover(
    file: str | Path,
    out: str | Path,
    budget_minutes: float | None = None,
    resume: bool = False,
    *,
    ckpt_every: int = 25,
    eval_text: str = "brown",
    eval_windows: int = 16,
    eval_seq_len: int = 1024,
    kl_segments: int = 8,
    model: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    reference: Any = None,
    stop_after: int | None = None,
    keep_ckpt: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Recover the quality of packed `file` by distillation; write `out` (same formats, same bpw).

    settings: recovery_config's keywords (steps, block_steps, lr, calib, segments, batch, seed, ...).
    budget_minutes: stop cleanly after the step that crosses the budget (checkpoint + result
    written; `resume=True` continues). stop_after: stop after this global step (as if
    interrupted). eval_windows: 0 skips the final held-out evaluation. Returns a dict with the loss curve,
    calibration KL before/after, byte counts and (if evaluated) the before/after rows.
    """
    from salomi.allocator import active_allocator
    from salomi.api import git_commit, map_large_allocations, peak_rss_mb, reference_for
    from salomi.calibration.data import calibration_segments
    from salomi.data.texts import load_text
    from salomi.evaluation.evaluate import tokenize
    from salomi.packing.model_file import load_quantized
    from salomi.progress import bar as progress_bar
    from salomi.recovery.repack import install_embeddings, install_quantlinears, repack_views, save_recovered

    t0 = time.perf_counter()
    commit = git_commit()  # the code this run loaded, not the checkout's state when it ends
    map_large_allocations()
    file, out = Path(file), Path(out)
    if file.resolve() == out.resolve():
        raise SalomiError("--out must differ from the input file (the input is the starting point)")
    cfg = recovery_config(**settings)
    calib, batch, seed = cfg["calib"], cfg["batch"], cfg["seed"]
    if ckpt_every < 1:
        raise SalomiError(f"checkpoint interval must be >= 1 (got {ckpt_every})")
    if budget_minutes is not None and budget_minutes <= 0:
        raise SalomiError(f"--budget-minutes must be positive (got {budget_minutes})")
    if eval_windows:
        _check_texts(calib, eval_text)
    dev = _default_device(device)
    torch.manual_seed(seed)

    qf = load_quantized(file)
    src_sha = _sha256(file)
    ref = reference or reference_for(qf, model)
    ref.model.to(dev).eval()
    ids = tokenize(ref.tokenizer, load_text(calib))
    segs = calibration_segments(ids, cfg["segments"], cfg["seg_len"], seed, calib)

    rec = Recovery(qf, ref, segs, cfg, dev)
    kl_segs = segs[: max(batch, min(kl_segments, len(segs)))]
    kl_before = calib_kl(rec.model, ref.model, kl_segs, batch, dev)  # the views start at the file's exact weights

    ckpt = Path(str(out) + ".ckpt")
    history: list[dict[str, Any]] = []
    start, opt_state, prev_seconds = 0, None, 0.0
    if resume and ckpt.exists():
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        if ck.get("version") != CKPT_VERSION or ck["source"]["sha256"] != src_sha:
            raise SalomiError(f"{ckpt}: checkpoint is for another input file; delete it or drop --resume")
        added = {"code_flip": 0.0, "train_embed": False, "body_dtype": "float32"}  # settings newer than some checkpoints: absent means the old behaviour
        unused = set() if cfg["train_codes"] else {"code_lr", "code_flip"}  # no latent codes: no effect
        diff = [k for k in RESUME_KEYS if k not in unused and ck["config"].get(k, added.get(k)) != cfg[k]]
        if diff:
            raise SalomiError(f"{ckpt}: checkpoint was made with other settings ({', '.join(diff)}); "
                              f"use the same settings or drop --resume")
        start, history, opt_state = int(ck["next_step"]), list(ck["history"]), ck.get("opt")
        prev_seconds = float(ck.get("seconds", 0.0))
        rec.load_state(ck["views"])
        torch.set_rng_state(ck["rng"])
        if torch.cuda.is_available() and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        if start > rec.total:
            raise SalomiError(f"{ckpt}: checkpoint is at step {start}, past this run's {rec.total} steps; "
                              f"ask for more --steps or drop --resume")
        print(f"[salomi] resuming recovery at step {start}/{rec.total}", file=sys.stderr)

    def save_ckpt(next_step: int, opt: torch.optim.Optimizer | None, stage_done: bool) -> None:
        kind, b, s = rec.stage_of(next_step - 1) if next_step else ("block", 0, -1)
        _atomic_save({
            "version": CKPT_VERSION,
            "source": {"path": str(file), "sha256": src_sha},
            "config": cfg,
            "next_step": next_step,
            "history": history,
            "views": rec.state(),
            "opt": None if (opt is None or stage_done) else opt.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "data": {"stage": kind, "block": b, "step_in_stage": s + 1, "segments": len(segs), "batch": batch},
            "seconds": prev_seconds + time.perf_counter() - t0,
        }, ckpt)

    pbar = progress_bar(rec.total, "recover", "step", disable=not progress, initial=start)
    stopped: str | None = None
    cur: tuple[str, int] | None = None
    opt: torch.optim.Optimizer | None = None
    done = start
    for g in range(start, rec.total):
        kind, b, s = rec.stage_of(g)
        if (kind, b) != cur:
            cur = (kind, b)
            opt = rec.optimizer(kind, b)
            if g == start and s > 0 and opt_state is not None and opt is not None:
                opt.load_state_dict(opt_state)
            if kind == "block":
                rec.prepare_block(b)
        loss = rec.loss(kind, b, s)
        flips = 0
        if opt is not None and loss.requires_grad:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg["train_codes"]:
                flips = rec.update_codes(kind, b)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise SalomiError(f"recovery diverged at step {g} ({kind}); lower the learning rate")
        history.append({"step": g, "stage": kind, "block": b, "loss": lv,
                        "t": round(prev_seconds + time.perf_counter() - t0, 2)})
        if flips:
            history[-1]["vq_codes_moved"] = flips
        stage_done = s + 1 == rec.stage_len(kind)
        if stage_done:
            if kind == "block":
                rec.finish_block(b)
            else:
                for v in rec.trained_views(kind, b):
                    v.snap_()
        done = g + 1
        pbar.set_postfix_str(f"block {b + 1}/{rec.n_blocks} nmse {lv:.4g}" if kind == "block" else f"e2e kl {lv:.4g}")
        pbar.update(1)
        if stop_after is not None and done >= stop_after and done < rec.total:
            stopped = "stop_after"
        elif budget_minutes is not None and time.perf_counter() - t0 > budget_minutes * 60 and done < rec.total:
            stopped = "budget"
        if stopped or done % ckpt_every == 0:
            save_ckpt(done, opt, stage_done)
        if stopped:
            break
    pbar.close()
    rec.acts = None

    views_info = describe_views(rec.views)
    if rec.embed_views:
        views_info["embedding table"] = describe_views(rec.embed_views)
    packed = repack_views(rec.views)
    embeddings = {**qf.embeddings, **repack_views(rec.embed_views)}
    install_quantlinears(rec.model, packed)
    if rec.embed_views:
        install_embeddings(rec.model, embeddings)
    kl_after = calib_kl(rec.model, ref.model, kl_segs, batch, dev)
    train_seconds = prev_seconds + time.perf_counter() - t0
    record = {
        "source": file.name, "source_sha256": src_sha[:16], "steps_done": done, "total_steps": rec.total,
        "complete": done >= rec.total, **cfg,
        "calib_kl": [round(kl_before, 6), round(kl_after, 6)], "seconds": round(train_seconds, 1),
        "git_commit": commit,
    }
    size = save_recovered(out, qf, rec.model.cpu(), packed, record, embeddings)
    if done >= rec.total and not keep_ckpt:
        ckpt.unlink(missing_ok=True)
    total = rec.total
    rec.views.clear()
    rec.model = None  # free the trained model before the evaluation loads two more

    new = load_quantized(out)
    res: dict[str, Any] = {
        "file": str(file), "out": str(out), "ckpt": str(ckpt) if ckpt.exists() else None,
        "steps_done": done, "total_steps": total, "complete": done >= total,
        "stopped": stopped, "history": history, "losses": [h["loss"] for h in history],
        "calib_kl_before": kl_before, "calib_kl_after": kl_after,
        "file_bytes_before": qf.file_bytes, "file_bytes_after": size,
        "linear_bpw_before": qf.linear_bpw, "linear_bpw_after": new.linear_bpw,
        "model_bpw_before": qf.model_bpw, "model_bpw_after": new.model_bpw,
        "header_bytes_added": size - qf.file_bytes, "views": views_info,
        "seconds": train_seconds, "peak_rss_mb": peak_rss_mb(), "device": str(dev), "allocator": active_allocator(),
    }
    if eval_windows:
        from salomi.api import evaluate_files

        ref.model.cpu()
        rows = evaluate_files([file, out], text=eval_text, seq_len=eval_seq_len, windows=eval_windows, model=model,
                              progress=progress, reference=ref)
        res["eval_before"], res["eval_after"] = rows
        res["ppl_ratio_before"], res["ppl_ratio_after"] = rows[0]["ratio"], rows[1]["ratio"]
    return res


def format_report(res: dict[str, Any]) -> str:
    """A few lines for the CLI."""
    lines = [
        f"wrote {res['out']}: {res['file_bytes_after']:,} bytes (input {res['file_bytes_before']:,}; "
        f"+{res['header_bytes_added']} header bytes for the recovery record, tensor data identical), "
        f"linear {res['linear_bpw_after']:.4f} bpw (input {res['linear_bpw_before']:.4f})",
        f"steps {res['steps_done']}/{res['total_steps']}" + (f" (stopped: {res['stopped']}; continue with --resume)"
                                                              if res["stopped"] else "")
        + f", {res['seconds']:.0f}s ({res['allocator']} malloc); calibration KL {res['calib_kl_before']:.4f} -> {res['calib_kl_after']:.4f}",
    ]
    if "eval_before" in res:
        b, a = res["eval_before"], res["eval_after"]
        lines.append(f"held-out {b['text']} ({b['windows']} windows x {b['seq_len']}): ppl {b['ppl']:.3f} -> "
                     f"{a['ppl']:.3f}, ratio to reference {b['ratio']:.3f} -> {a['ratio']:.3f}, "
                     f"KL {b['kl']:.4f} -> {a['kl']:.4f}")
    return "\n".join(lines)

