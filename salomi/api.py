"""The Python API behind the CLI: quantize, evaluate, inspect, export, generate."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salomi.errors import SalomiError
from salomi.evaluation.evaluate import Protocol, evaluate, make_windows, tokenize
from salomi.loading.models import DEFAULT_MODEL, Reference, load_reference
from salomi.packing import container
from salomi.packing.model_file import QuantizedFile, build_model, load_quantized, save_quantized
from salomi.quantizers.base import PackedLinear, Quantizer
from salomi.quantizers.spec import parse_method

DEFAULT_CALIB = "austen"
DEFAULT_EVAL = "brown"


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Ask glibc to serve every allocation >= threshold bytes by mmap (and unmap it on free).

    Training allocates and frees thousands of weight-sized tensors (1-10 MB) per step; glibc's
    default raises its mmap threshold to 32 MB after the first frees, so they land on the heap,
    fragment it, and the resident size grows far past what is live (measured on distillation
    recovery of the default model: 16.3 GB resident vs 5.8 GB with this). Returns False where
    mallopt is unavailable (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False


def _text_ids(tokenizer: Any, text: str) -> torch.Tensor:
    from salomi.data.texts import load_text

    ids = tokenize(tokenizer, load_text(text))
    if ids.numel() == 0:
        raise SalomiError(f"text {text!r} is empty after tokenization; give a text with content")
    return ids


def _float_dtype(name: str) -> torch.dtype:
    try:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    except KeyError:
        raise SalomiError(f"--float-dtype must be float16, bfloat16 or float32 (got {name!r})") from None


TABLE_SEGMENTS = 16  # a budget table's default calibration segments, at most (every measured budget since session 15 used 16)


def quantize(
    model: str = DEFAULT_MODEL,
    method: str = "rtn:2:g64",
    out: str | Path = "model.salomi",
    calib: str = DEFAULT_CALIB,
    segments: int = 128,
    seg_len: int = 512,
    seed: int = 0,
    float_dtype: str = "float16",
    resume: bool = False,
    progress: bool = True,
    reference: Reference | None = None,
    recipe: dict[str, str] | None = None,
    label: str | None = None,
    target_linear_bpw: float | None = None,
    target_model_bpw: float | None = None,
    candidates: Sequence[str] | None = None,
    embed: str | None = None,
    damage: str = "kl",
    table_segments: int | None = None,
    table_seed: int | None = None,
    true_sequential: bool = False,
) -> dict[str, Any]:
    """Quantize `model` with `method`, a per-layer `recipe`, or the best recipe for a bpw target.

    `embed` (e.g. "rtn:4:g64", "gptq:4:g64+ls") also packs the token embedding table, which a tied
    head shares; by default it is stored as `float_dtype`.

    With `target_linear_bpw` / `target_model_bpw` a sensitivity table is measured (cached) and
    a recipe chosen whose stored bytes fit the target exactly; `method` is then only the
    default for layers the recipe does not name. `damage` is what the allocator minimises:
    "damage" (normalised Hessian proxy), "error" (raw proxy) or "kl" (measured single-layer KL).
    The table is measured on `table_segments` calibration segments drawn with `table_seed` (defaults:
    min(segments, 16), the set-up every measured budget in docs/RESULTS.md used since session 15, and
    the quantization's seed), so one cached table serves quantizations with more calibration or
    another seed. `true_sequential` takes each group of a block's linears (q/k/v, o, gate/up, down)
    with the groups before it already quantized; False takes a block's Hessians in one float pass.
    """
    commit = git_commit()  # the code this run loaded, not the checkout's state when it ends
    table_segments = min(segments, TABLE_SEGMENTS) if table_segments is None else table_segments
    table_seed = seed if table_seed is None else table_seed
    budget = target_linear_bpw is not None or target_model_bpw is not None
    own_reference = reference is None  # loaded here, so quantized in place: no second copy of the weights
    budget_info: dict[str, Any] = {}  # how the recipe was chosen, recorded in the file
    if budget:
        from salomi.mixed import DEFAULT_CANDIDATES, make_plan

        budget_info = {"damage": damage, "candidates": list(candidates or DEFAULT_CANDIDATES)}
        reference = reference or load_reference(model)
        plan = make_plan(reference, target_linear_bpw=target_linear_bpw, target_model_bpw=target_model_bpw,
                         candidates=budget_info["candidates"], calib=calib,
                         segments=table_segments, seg_len=seg_len, seed=table_seed,
                         float_dtype=float_dtype, damage=damage, progress=progress,
                         embed=embed)
        recipe = plan.recipe
        if plan.embed_choices:  # several --embed choices: the plan picked one
            budget_info["embed_choices"] = {k: round(v, 6) for k, v in plan.embed_choices.items()}
            embed = plan.embed
        label = label or (f"budget:{target_linear_bpw}bpw" if target_linear_bpw is not None
                          else f"budget:model{target_model_bpw}bpw")
        method = "binary"
    start = time.perf_counter()
    quantizer = parse_method(method)
    embed_q = None
    if embed and "," in embed:
        raise SalomiError(f"--embed {embed!r}: several choices need a --model-bpw budget to choose between them")
    if embed:
        from salomi.quantizers.embedding import parse_embed_method

        embed_q = parse_embed_method(embed)
    per_layer = {name: parse_method(spec) for name, spec in (recipe or {}).items()}
    fdtype = _float_dtype(float_dtype)
    torch.manual_seed(seed)
    ref = reference or load_reference(model)
    if not own_reference:  # the caller keeps its copy pristine; quantize a clone
        import copy

        ref = copy.copy(reference)
        ref.model = copy.deepcopy(reference.model)

    def choose(name: str) -> Quantizer:
        return per_layer.get(name, quantizer)

    from salomi.loading.models import linear_names, linear_weight

    for layer in linear_names(ref.model).values():  # refuse a bad shape before any slow work
        for name, mod in layer.items():
            choose(name).check_shape(tuple(linear_weight(mod).shape))
    needs_h = (quantizer.needs_hessian or any(q.needs_hessian for q in per_layer.values())
               or (embed_q is not None and embed_q.needs_hessian))
    segs = None
    calib_info: dict[str, Any] = {}
    if needs_h:
        from salomi.calibration.data import calibration_segments

        ids = _text_ids(ref.tokenizer, calib)
        segs = calibration_segments(ids, segments, seg_len, seed, calib)
        # torch's thread count is recorded: before 851745a it changed the bits (the same seed on 1 and
        # 2 threads gave different VQ layers from block 2 on; docs/RESULTS.md, session 17)
        calib_info = {"text": calib, "segments": segments, "seg_len": seg_len, "seed": seed,
                      "true_sequential": true_sequential, "torch_threads": torch.get_num_threads()}
        if budget and (table_segments, table_seed) != (segments, seed):
            calib_info["table"] = {"segments": table_segments, "seed": table_seed}
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    done: dict[str, PackedLinear] = {}
    if resume and partial.exists():
        done = _load_partial(partial, method)
        print(f"[salomi] resuming: {len(done)} layers already quantized", file=sys.stderr)

    def checkpoint(_i: int, packed: dict[str, PackedLinear]) -> None:
        _save_partial(partial, packed, method)

    from salomi.calibration.sequential import quantize_sequential

    packed = quantize_sequential(ref.model, choose, segs, progress=progress, on_block_done=checkpoint, done=done,
                                 true_sequential=true_sequential)
    embeddings = None
    if embed_q is not None:
        from salomi.quantizers.embedding import quantize_embeddings

        if progress:
            print(f"[salomi] quantizing the embedding table with {embed_q.spec}", file=sys.stderr)
        embeddings = quantize_embeddings(ref.model, embed_q, segs)
    seconds = time.perf_counter() - start
    meta = {
        "model": {"id": model, "name": ref.name, "source": ref.source},
        "recipe": {"label": label or (method if not recipe else f"recipe({method})"), "default": method,
                   "layers": {n: p.method for n, p in packed.items()},
                   **({"embeddings": embed_q.spec} if embed_q is not None else {}),
                   **({"budget": budget_info} if budget else {})},
        "calibration": calib_info,
        "quantize": {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb()), "seed": seed,
                     "git_commit": commit, "torch": torch.__version__},
    }
    size = save_quantized(out, ref.model, ref.tokenizer, packed, meta, fdtype, embeddings)
    partial.unlink(missing_ok=True)
    qf = load_quantized(out)
    return {"file": str(out), "file_bytes": size, "linear_bpw": qf.linear_bpw, "model_bpw": qf.model_bpw,
            "method": method, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def pack_embeddings(file: str | Path, embed: str, out: str | Path, calib: str | None = None,
                    segments: int | None = None, seg_len: int | None = None, seed: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Pack the embedding table of an already quantized file (its linears are kept byte for byte).

    GPTQ methods use the head-input Hessian of the *quantized* model on the file's own
    calibration text (or the one given)."""
    from salomi.quantizers.embedding import parse_embed_method, quantize_embeddings

    start = time.perf_counter()
    qf = load_quantized(file)
    if qf.embeddings:
        raise SalomiError(f"{file}: its embeddings are packed already ({qf.metadata['recipe'].get('embeddings')})")
    q = parse_embed_method(embed)
    cal = dict(qf.metadata.get("calibration") or {})
    cal = {"text": calib or cal.get("text", DEFAULT_CALIB), "segments": segments or cal.get("segments", 128),
           "seg_len": seg_len or cal.get("seg_len", 512), "seed": cal.get("seed", 0) if seed is None else seed}
    model = build_model(qf, "dequant")
    tok = qf.tokenizer()
    segs = None
    if q.needs_hessian:
        from salomi.calibration.data import calibration_segments

        segs = calibration_segments(_text_ids(tok, cal["text"]), cal["segments"], cal["seg_len"], cal["seed"],
                                    cal["text"])
    if progress:
        print(f"[salomi] packing the embedding table of {file} with {q.spec}", file=sys.stderr)
    with torch.no_grad():
        embeddings = quantize_embeddings(model, q, segs)
    meta = dict(qf.metadata)
    meta["recipe"] = {**meta.get("recipe", {}), "embeddings": q.spec}
    meta["embedding_calibration"] = cal if segs is not None else {}
    for k in ("tokenizer_encoding", "embeddings"):  # written afresh; reference_params etc. carry over
        meta.pop(k, None)
    from salomi.recovery.repack import RawTokenizer, float_dtype_of

    size = save_quantized(out, model, RawTokenizer(qf.tokenizer_files), qf.packed, meta, float_dtype_of(qf),
                          embeddings)
    new = load_quantized(out)
    if new.reference_params != qf.reference_params:
        raise SalomiError(f"{out}: parameter count changed while packing embeddings (bug)")
    return {"file": str(out), "file_bytes": size, "linear_bpw": new.linear_bpw, "model_bpw": new.model_bpw,
            "method": f"{qf.method} +embed {q.spec}", "seconds": time.perf_counter() - start}


def _save_partial(path: Path, packed: dict[str, PackedLinear], method: str) -> None:
    tensors, layers = {}, {}
    for n, p in packed.items():
        layers[n] = {"method": p.method, "format": p.format, "shape": list(p.shape), "params": p.params,
                     "tensors": sorted(p.tensors)}
        tensors.update({f"q/{n}/{t}": a for t, a in p.tensors.items()})
    container.save(path, tensors, {"kind": "salomi-partial", "method": method, "layers": layers})


def _load_partial(path: Path, method: str) -> dict[str, PackedLinear]:
    c = container.load(path)
    if c.metadata.get("kind") != "salomi-partial" or c.metadata.get("method") != method:
        raise SalomiError(f"{path}: checkpoint is for another method; delete it or drop --resume")
    return {
        n: PackedLinear(i["method"], i["format"], tuple(i["shape"]), {t: np.array(c.tensors[f"q/{n}/{t}"])
                                                                       for t in i["tensors"]}, i["params"])
        for n, i in c.metadata["layers"].items()
    }


def reference_for(qf: QuantizedFile, model: str | None = None) -> Reference:
    src = model or qf.metadata.get("model", {}).get("id") or qf.metadata.get("model", {}).get("source")
    if not src:
        raise SalomiError(f"{qf.path}: the file does not say which reference it came from; pass --model")
    return load_reference(src)


def evaluate_files(
    files: Sequence[str | Path],
    text: str = DEFAULT_EVAL,
    seq_len: int = 1024,
    windows: int = 64,
    model: str | None = None,
    runtime: str = "dequant",
    progress: bool = True,
    reference: Reference | None = None,
    activations: str = "float",
) -> list[dict[str, Any]]:
    """Evaluate packed files against their reference on the same windows (one reference pass).
    activations="int8" (engine only) scores the int8-activation kernels, so their cost is measured."""
    qfs = [load_quantized(f) for f in files]
    ref = reference or reference_for(qfs[0], model)
    ids = _text_ids(ref.tokenizer, text)
    w = make_windows(ids, seq_len, windows, text)
    start = time.perf_counter()
    models = [_eval_model(qf, runtime, seq_len, activations) for qf in qfs]
    ref_m, rows = evaluate(ref.model, models, w, progress=progress)
    seconds = time.perf_counter() - start
    out = []
    for qf, r in zip(qfs, rows):
        label = qf.method if activations == "float" else f"{qf.method} [{activations}]"
        out.append(_row(ref, label, r, qf.linear_bpw, qf.model_bpw, qf.file_bytes, text, seq_len, windows,
                        seconds / len(qfs), qf.metadata.get("calibration", {}), str(qf.path)))
    return out


def _eval_model(qf: QuantizedFile, runtime: str, seq_len: int, activations: str = "float") -> torch.nn.Module:
    if resolve_runtime(qf, runtime) == "engine":
        from salomi.runtime.engine import Engine

        return Engine.from_file(qf, max_seq=seq_len, activations=activations).as_module()
    if activations != "float":
        raise SalomiError(f"--activations {activations} needs the native engine; use --runtime engine")
    return build_model(qf, runtime)


def resolve_runtime(qf: QuantizedFile, runtime: str) -> str:
    """"engine" when asked for (or, for "auto", when it can run the file), else `runtime`.

    "auto" picks the native engine when the architecture and every layer format are
    supported, else falls back to the per-layer kernels / dequant path as before.
    """
    if runtime not in ("engine", "auto"):
        return runtime
    from salomi.runtime import kernels
    from salomi.runtime.engine import unsupported_reason

    reason = unsupported_reason(qf) if kernels.available() else "the C extension is not built"
    if runtime == "engine":
        if reason:
            raise SalomiError(reason if "--runtime" in reason
                              else f"the native engine cannot run this file ({reason}); use --runtime kernels or dequant")
        return "engine"
    return "auto" if reason else "engine"


def evaluate_reference(model: str = DEFAULT_MODEL, text: str = DEFAULT_EVAL, seq_len: int = 1024, windows: int = 64,
                       progress: bool = True, reference: Reference | None = None) -> dict[str, Any]:
    from salomi.evaluation.evaluate import (
        cached_reference_ppl,
        perplexity,
        reference_cache_key,
        store_reference_ppl,
    )

    ref = reference or load_reference(model)
    ids = _text_ids(ref.tokenizer, text)
    w = make_windows(ids, seq_len, windows, text)
    key = reference_cache_key(ref.source, Protocol(text, seq_len, windows), w)
    start = time.perf_counter()
    ppl = cached_reference_ppl(key)
    cached = ppl is not None
    if ppl is None:
        ppl = perplexity(ref.model, w, progress=progress, label="reference")
        store_reference_ppl(key, ppl, {"model": ref.source, "text": text, "seq_len": seq_len, "windows": windows})
    r = {"ppl": ppl, "kl": 0.0, "top1": 1.0, "ref_ppl": ppl, "ratio": 1.0}
    row = _row(ref, "reference (float32)", r, 32.0, 32.0, None, text, seq_len, windows,
               time.perf_counter() - start, {}, None)
    row["cached"] = cached
    return row


def _row(ref: Reference, method: str, r: dict[str, float], linear_bpw: float, model_bpw: float, file_bytes: int | None,
         text: str, seq_len: int, windows: int, seconds: float, calib: dict[str, Any], file: str | None) -> dict[str, Any]:
    return {
        "model": ref.name, "method": method, "ppl": r["ppl"], "ref_ppl": r["ref_ppl"], "ratio": r["ratio"],
        "kl": r["kl"], "top1": r["top1"], "linear_bpw": linear_bpw, "model_bpw": model_bpw, "file_bytes": file_bytes,
        "text": text, "tokens": windows * (seq_len - 1), "seq_len": seq_len, "windows": windows,
        "seconds": round(seconds, 1), "calibration": calib, "file": file, "git_commit": git_commit(),
    }


def export_dequantized(file: str | Path, out_dir: str | Path) -> Path:
    """Write a plain float32 Hugging Face checkpoint of the quantized weights."""
    import shutil
    import tempfile

    qf = load_quantized(file)
    model = build_model(qf, "dequant")
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items()}
    for name, p in {**qf.packed, **qf.embeddings}.items():
        w = p.dequantize()
        target = plain.get_submodule(name)
        state[f"{name}.weight"] = w.t().contiguous() if isinstance(target, Conv1D) else w
    plain.load_state_dict(state, strict=False)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    plain.save_pretrained(tmp)
    qf.tokenizer().save_pretrained(tmp)
    (tmp / "salomi_export.json").write_text(json.dumps({"source": str(qf.path), "method": qf.method,
                                                         "linear_bpw": qf.linear_bpw, "model_bpw": qf.model_bpw}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def generate(file: str | Path, prompt: str, max_new_tokens: int = 64, runtime: str = "auto",
             temperature: float = 0.0, seed: int = 0, activations: str = "float") -> Iterator[str]:
    """Stream decoded text pieces; the last item is a stats line (tokens/s)."""
    qf = load_quantized(file)
    tok = qf.tokenizer()
    if not prompt:
        raise SalomiError("--prompt is empty; give some text to continue")
    runtime = resolve_runtime(qf, runtime)
    if runtime == "engine":
        yield from _generate_engine(qf, tok, prompt, max_new_tokens, temperature, seed, activations)
        return
    if activations != "float":
        raise SalomiError(f"--activations {activations} needs the native engine; use --runtime engine")
    model = build_model(qf, runtime)
    from salomi.runtime import kernels

    if runtime != "dequant" and kernels.available():
        torch.set_num_threads(1)  # the kernels run their own 2 threads; torch's pool would fight them
    ids = tokenize(tok, prompt)[None]
    torch.manual_seed(seed)
    past = None
    generated: list[int] = []
    printed = ""
    eos = getattr(tok, "eos_token_id", None)
    t0 = time.perf_counter()
    t_first = None
    with torch.inference_mode():
        x = ids
        for _ in range(max_new_tokens):
            out = model(x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1))
            else:
                nxt = int(logits.argmax())
            if t_first is None:
                t_first = time.perf_counter()
            if nxt == eos:
                break
            generated.append(nxt)
            text = tok.decode(generated, skip_special_tokens=True)
            yield text[len(printed):]
            printed = text
            x = torch.tensor([[nxt]])
    t1 = time.perf_counter()
    n = len(generated)
    decode_s = t1 - (t_first or t1)
    tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
    yield (f"\n[{n} tokens; prefill {ids.shape[1]} tokens in {(t_first or t1) - t0:.2f}s; "
           f"decode {tps:.1f} tokens/s; runtime {runtime}]\n")



def _generate_engine(qf: QuantizedFile, tok: Any, prompt: str, max_new_tokens: int, temperature: float,
                     seed: int, activations: str = "float") -> Iterator[str]:
    """generate() through the native engine: one C call per token."""
    from salomi.runtime.engine import Engine

    ids = tokenize(tok, prompt)
    eng = Engine.from_file(qf, max_seq=min(4096, ids.numel() + max_new_tokens), activations=activations)
    generated: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    t_first = None
    for nxt in eng.generate(ids, max_new_tokens, temperature, seed, getattr(tok, "eos_token_id", None)):
        if t_first is None:
            t_first = time.perf_counter()
        generated.append(nxt)
        text = tok.decode(generated, skip_special_tokens=True)
        yield text[len(printed):]
        printed = text
    t1 = time.perf_counter()
    n = len(generated)
    decode_s = t1 - (t_first or t1)
    tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
    yield (f"\n[{n} tokens; prefill {ids.numel()} tokens in {(t_first or t1) - t0:.2f}s; "
           f"decode {tps:.1f} tokens/s; runtime engine]\n")
