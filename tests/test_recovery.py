"""`salomi recover`: distillation on the tiny Llama fixture (rtn:2:g32), same bytes, resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from salomi.packing import container
from salomi.packing.model_file import load_quantized
from salomi.recovery import run_recover
from salomi.recovery.trainable import make_view

# Tiny settings: 2 blocks x BLOCK_STEPS + STEPS steps, 4 segments of 32 tokens, batch 2.
SMALL = dict(segments=4, seg_len=32, batch=2, eval_windows=0, progress=False, kl_segments=4)


def _header(path: Path) -> int:
    c = container.load(path)
    return c.file_bytes - max(e["offsets"][1] for e in c.entries.values())


def test_recovery_lowers_kl_and_keeps_bytes(packed: Path, austen_slice: Path, brown_slice: Path,
                                            tmp_path: Path) -> None:
    out = tmp_path / "r.salomi"
    res = run_recover(packed, out, steps=6, block_steps=4, calib=str(austen_slice), lr=3e-3, block_lr=3e-3,
                      **{**SMALL, "eval_windows": 1}, eval_text=str(brown_slice), eval_seq_len=64)
    assert res["complete"] and res["steps_done"] == 2 * 4 + 6 == len(res["losses"])
    assert res["calib_kl_after"] < res["calib_kl_before"]
    assert res["ckpt"] is None and not Path(str(out) + ".ckpt").exists()
    # Same formats, same tensors (names, dtypes, shapes, offsets), same data bytes and linear bpw.
    a, b = load_quantized(packed), load_quantized(out)
    assert a.linear_bytes == b.linear_bytes and a.linear_bpw == b.linear_bpw == res["linear_bpw_after"]
    ca, cb = container.load(packed), container.load(out)
    assert sorted(ca.entries) == sorted(cb.entries)
    for n, e in ca.entries.items():
        assert (e["dtype"], e["shape"], e["offsets"]) == (cb.entries[n]["dtype"], cb.entries[n]["shape"],
                                                          cb.entries[n]["offsets"])
        if not n.startswith("q/") or n.endswith("/codes"):
            assert np.array_equal(ca.tensors[n], cb.tensors[n]), n  # floats, tokenizer and codes untouched
    # The file size differs only by the JSON header (the recovery record); the data section is identical.
    assert out.stat().st_size - _header(out) == packed.stat().st_size - _header(packed)
    assert res["file_bytes_after"] - res["file_bytes_before"] == _header(out) - _header(packed)
    changed = sum(not np.array_equal(ca.tensors[n], cb.tensors[n]) for n in ca.entries if n.endswith("/scale"))
    assert changed > 0
    for name, p in b.packed.items():
        q = a.packed[name]
        assert (p.format, p.shape, p.params) == (q.format, q.shape, q.params)
    rec = b.metadata["recovery"][-1]
    assert rec["steps_done"] == 14 and rec["calib_kl"][1] < rec["calib_kl"][0]
    assert b.metadata["recipe"] == a.metadata["recipe"]
    assert res["eval_after"]["windows"] == 1 and res["ppl_ratio_after"] > 0


def test_resume_reproduces_uninterrupted_run(packed: Path, austen_slice: Path, tmp_path: Path) -> None:
    kw = dict(steps=4, block_steps=3, calib=str(austen_slice), ckpt_every=100, **SMALL)
    full = run_recover(packed, tmp_path / "full.salomi", **kw)
    out = tmp_path / "part.salomi"
    # Interrupted inside block 1 (step 4 = block 1, step 1: optimizer state and activations restored) ...
    r1 = run_recover(packed, out, stop_after=4, **kw)
    assert r1["stopped"] == "stop_after" and r1["steps_done"] == 4 and Path(r1["ckpt"]).exists()
    # ... then inside the end-to-end stage ...
    r2 = run_recover(packed, out, resume=True, stop_after=8, **kw)
    assert r2["steps_done"] == 8
    # ... then to the end.
    r3 = run_recover(packed, out, resume=True, **kw)
    assert r3["complete"] and r3["steps_done"] == 10
    assert len(r3["losses"]) == len(full["losses"]) == 10
    np.testing.assert_allclose(r3["losses"], full["losses"], rtol=0, atol=1e-6)
    assert r3["losses"][:4] == r1["losses"] and r3["losses"][:8] == r2["losses"]
    ca, cb = container.load(tmp_path / "full.salomi"), container.load(out)
    for n in ca.entries:
        if n.startswith("q/"):
            assert np.array_equal(ca.tensors[n], cb.tensors[n]), n
    # A changed setting is refused rather than silently mixed in.
    run_recover(packed, out, stop_after=2, **kw)
    from salomi.errors import SalomiError

    with pytest.raises(SalomiError, match="other settings"):
        run_recover(packed, out, resume=True, **{**kw, "block_lr": 1e-2})
    # Code settings have no effect without --train-codes, so they do not block a resume.
    r4 = run_recover(packed, out, resume=True, stop_after=3, **{**kw, "code_flip": 0.5, "code_lr": 0.1})
    assert r4["steps_done"] == 3 and r4["losses"][:2] == full["losses"][:2]


def test_budget_stops_cleanly(packed: Path, austen_slice: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.salomi"
    res = run_recover(packed, out, steps=50, block_steps=50, budget_minutes=1e-6, calib=str(austen_slice), **SMALL)
    assert res["stopped"] == "budget" and res["steps_done"] == 1
    assert load_quantized(out).linear_bpw == load_quantized(packed).linear_bpw
    assert Path(res["ckpt"]).exists()


def test_train_codes_ste_keeps_layout(packed: Path, austen_slice: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.salomi"
    res = run_recover(packed, out, steps=3, block_steps=3, train_codes=True, code_lr=0.3,
                      calib=str(austen_slice), **SMALL)
    a, b = container.load(packed), container.load(out)
    codes = [n for n in a.entries if n.endswith("/codes")]
    assert any(not np.array_equal(a.tensors[n], b.tensors[n]) for n in codes)  # some codes moved
    for n in a.entries:
        assert a.entries[n]["shape"] == b.entries[n]["shape"] and a.entries[n]["dtype"] == b.entries[n]["dtype"]
    assert res["linear_bpw_after"] == res["linear_bpw_before"]
    assert res["views"]["grid"]["latent_codes"] > 0


def test_vq_codes_follow_their_latent_to_the_nearest_centroid() -> None:
    """--train-codes on VQ: the gradient reaches the latents (straight through) and the codebook;
    update_codes moves a code only when its latent has entered another centroid's cell, at most
    max_flip of the codes per call, furthest-in first; the repacked layer holds the new codes
    and computes the view's weight."""
    from salomi.quantizers.spec import parse_method
    from salomi.quantizers.vq import VQFormat
    from salomi.recovery.trainable import VQView

    g = torch.Generator().manual_seed(1)
    p = parse_method("vq:d2:k16").quantize(torch.randn(8, 32, generator=g))  # 128 codes
    v = make_view(p, train_codes=True, code_flip=1e-3)
    assert isinstance(v, VQView) and v.code_params()
    codes0 = torch.from_numpy(VQFormat()._codes(p).astype(np.int64)).reshape(-1)
    cb = torch.from_numpy(np.asarray(p.tensors["codebook"], np.float32))
    w = v.weight()
    (w * torch.randn(w.shape, generator=g)).sum().backward()
    assert v.latent.grad is not None and v.latent.grad.abs().sum() > 0
    assert v.codebook.delta.grad is not None and v.codebook.delta.grad.abs().sum() > 0
    assert v.update_codes() == 0 and torch.equal(v.codes, codes0)  # latents at their centroids: nothing moves

    def other(i: int) -> int:
        return int((codes0[i] + 1) % 16)

    with torch.no_grad():  # vectors 0 and 1 deep into another cell, 2 barely, 3 a little way towards one
        for i, t in ((0, 0.95), (1, 0.9), (2, 0.55), (3, 0.1)):
            v.latent[i] = ((1 - t) * cb[codes0[i]] + t * cb[other(i)]) / v.unit
    want = [int(((v.latent[i].detach() * v.unit - cb) ** 2).sum(1).argmin()) for i in range(4)]
    assert want[3] == codes0[3] and all(want[i] != codes0[i] for i in range(2))
    v.max_flip = 2 / 128
    assert v.update_codes() == 2  # the cap: the two furthest in move first
    assert [int(c) for c in v.codes[:2]] == want[:2] and torch.equal(v.codes[2:], codes0[2:])
    v.max_flip = 1.0
    assert v.update_codes() == int(want[2] != codes0[2])
    assert int(v.codes[3]) == int(codes0[3]) and torch.equal(v.codes[4:], codes0[4:])
    moved = v.pack()
    moved.validate()
    assert np.array_equal(VQFormat()._codes(moved).reshape(-1), v.codes.numpy())
    torch.testing.assert_close(v.weight().detach(), moved.dequantize(), rtol=1e-6, atol=1e-6)


def test_vq_codebook_gradient_sums_per_centroid_also_after_codes_move() -> None:
    """The codebook's gradient (a sparse one-hot matmul, cached per set of codes) equals the
    scatter-add of embedding's backward, and follows codes moved in place."""
    import torch.nn.functional as F

    from salomi.quantizers.spec import parse_method

    g = torch.Generator().manual_seed(2)
    p = parse_method("vq:d2:k16").quantize(torch.randn(8, 32, generator=g))
    v = make_view(p, train_codes=True, code_flip=1.0)
    for _ in range(2):
        up = torch.randn(8, 32, generator=g)
        v.codebook.delta.grad = None
        (v.weight() * up).sum().backward()
        cb = v.codebook.value().detach().requires_grad_()
        (F.embedding(v.codes, cb).reshape(8, 32) * v.scale.value().detach()[:, None] * up).sum().backward()
        torch.testing.assert_close(v.codebook.delta.grad, cb.grad * v.codebook.mag)
        with torch.no_grad():
            v.codes.copy_((v.codes + 3) % 16)  # every code moves: a stale one-hot would give other sums


@pytest.mark.parametrize("spec", ["vq:d2:k16", "vq:d4:k64+ls+rot", "gptq:2:g32+rot"])
def test_hand_written_backwards_match_autograd(spec: str) -> None:
    """The VQ decode and the +rot unrotation have their own backward (nothing of weight size
    saved; light VQ views skip checkpointing): same weight and same gradients as autograd
    through embedding, the row scale and the transforms."""
    import torch.nn.functional as F

    from salomi.quantizers.rotation import unrotate_weight
    from salomi.quantizers.spec import parse_method

    g = torch.Generator().manual_seed(3)
    q = parse_method(spec)
    x = torch.randn(256, 64, generator=g)
    p = q.quantize(torch.randn(24, 64, generator=g), 2 * x.T @ x / 256 if q.needs_hessian else None)
    v = make_view(p)
    inner = getattr(v, "inner", v)
    assert v.light == spec.startswith("vq")
    with torch.no_grad():
        for c in v.conts():
            c.delta.add_(0.01 * torch.randn(c.delta.shape, generator=g))
    up = torch.randn(24, 64, generator=g)
    (v.weight() * up).sum().backward()
    got = [c.delta.grad.clone() for c in v.conts()]
    for c in v.conts():
        c.delta.grad = None
    with torch.no_grad():
        q0 = inner.weight()
    if spec.startswith("vq"):
        cb = inner.codebook.value().detach().requires_grad_()
        sc = inner.scale.value().detach().requires_grad_()
        q0 = F.embedding(inner.codes, cb).reshape(24, 64) * sc[:, None]
        leaves = [(cb, inner.codebook), (sc, inner.scale)]
    else:  # the grid's own view under the rotation, through autograd's transforms
        q0 = inner.weight()
        leaves = []
    w = unrotate_weight(q0, v.seed) if hasattr(v, "inner") else q0
    torch.testing.assert_close(v.weight().detach(), w.detach())
    (w * up).sum().backward()
    if leaves:
        for a, (leaf, cont) in zip(got, leaves):
            torch.testing.assert_close(a, leaf.grad * cont.mag, rtol=1e-4, atol=1e-6)
    else:
        for a, c in zip(got, v.conts()):
            torch.testing.assert_close(a, c.delta.grad, rtol=1e-4, atol=1e-6)


def test_vq_train_codes_recovery_moves_codes_and_resumes(tiny_llama_dir: Path, austen_slice: Path,
                                                          tmp_path: Path) -> None:
    from salomi import api

    src = tmp_path / "vq.salomi"
    api.quantize(model=str(tiny_llama_dir), method="vq:d2:k16", out=src, progress=False)
    kw = dict(steps=4, block_steps=2, train_codes=True, code_lr=0.2, code_flip=0.01, calib=str(austen_slice), ckpt_every=100,
              **SMALL)
    full = run_recover(src, tmp_path / "full.salomi", **kw)
    assert full["views"]["vq"]["latent_codes"] > 0
    a, b = container.load(src), container.load(tmp_path / "full.salomi")
    codes = [n for n in a.entries if n.endswith("/codes")]
    assert any(not np.array_equal(a.tensors[n], b.tensors[n]) for n in codes)
    assert full["linear_bpw_after"] == full["linear_bpw_before"]
    assert any(h.get("vq_codes_moved") for h in full["history"])
    from salomi.errors import SalomiError

    with pytest.raises(SalomiError, match="code-flip"):
        run_recover(src, tmp_path / "bad.salomi", **{**kw, "code_flip": 1.5})
    _assert_resumes(src, tmp_path / "part.salomi", kw, full, b, codes, stop_after=5)


def _assert_resumes(src: Path, out: Path, kw: dict, full: dict, full_file: container.Container, names: list[str],
                    stop_after: int) -> None:
    """Interrupted after `stop_after` steps and resumed: the same loss curve and the same `names` tensors."""
    run_recover(src, out, stop_after=stop_after, **kw)
    r = run_recover(src, out, resume=True, **kw)
    np.testing.assert_allclose(r["losses"], full["losses"], rtol=0, atol=1e-6)
    c = container.load(out)
    for n in names:
        assert np.array_equal(full_file.tensors[n], c.tensors[n]), n


def _formats() -> list[str]:
    return ["binary:g32", "ternary:g32", "rtn:2:g32", "gptq:2:g32:act", "vq:d2:k16", "billm", "pbllm:0.1",
            "pbllm:0.1:fp16", "rtn:2:g32+lowrank:r4", "binary:g32+lowrank:r4", "vq:d2:k16+rot", "gptq:binary+rot"]


@pytest.mark.parametrize("spec", _formats())
def test_views_start_exact_and_repack_identically(spec: str) -> None:
    """Untrained, every view computes the file's weight and repacks to the same bytes;
    after a change, the repacked layer keeps its layout and matches the view up to fp16 rounding."""
    from salomi.quantizers.spec import parse_method

    q = parse_method(spec)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    h = 2 * x.T @ x / 256
    p = q.quantize(w, h if q.needs_hessian else None)
    for codes, flip in ((False, 0.0), (True, 0.0), (True, 1e-3)):
        v = make_view(p, train_codes=codes, code_flip=flip)
        torch.testing.assert_close(v.weight().detach(), p.dequantize(), rtol=1e-6, atol=1e-6)
        same = v.pack()
        for t, a in p.tensors.items():
            assert np.array_equal(np.asarray(a), same.tensors[t]), (spec, t)
        with torch.no_grad():
            for c in v.conts():
                c.delta.add_(0.01 * torch.randn(c.delta.shape, generator=g))
        moved = v.pack()
        moved.validate()
        for t, a in p.tensors.items():
            assert (np.asarray(a).dtype, np.shape(a)) == (moved.tensors[t].dtype, moved.tensors[t].shape)
        v.snap_()
        torch.testing.assert_close(v.weight().detach(), moved.dequantize(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_kl_matches_full_logits(arch: str, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    """kl_loss (logits made and freed in chunks, recomputed in backward) = KL on the full logits,
    value and gradient, including a last partial chunk."""
    from transformers import AutoModelForCausalLM

    from salomi.recovery.distill import _kl, kl_loss

    d = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    ref = AutoModelForCausalLM.from_pretrained(d).eval()
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = [p for n, p in model.named_parameters() if "wte" not in n and "embed_tokens" not in n]
    ids = torch.randint(0, 50257, (2, 40))

    full = _kl(model(ids, use_cache=False).logits, ref(ids, use_cache=False).logits.detach())
    g_full = torch.autograd.grad(full, params)
    chunked = kl_loss(model, ref, ids, chunk=32)  # 80 tokens: chunks of 32, 32, 16
    g_chunked = torch.autograd.grad(chunked, params)
    assert float(full.detach()) > 1e-3
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_full, g_chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_reused_weights_follow_in_place_updates() -> None:
    """Inside reused_weights the weight is built once, and rebuilt after any in-place change of a
    stored value (optimizer step, snap_); outside it every call rebuilds; the cache is freed on exit."""
    from salomi.quantizers.spec import parse_method
    from salomi.recovery.trainable import TrainableLinear, reused_weights

    g = torch.Generator().manual_seed(0)
    p = parse_method("vq:d2:k16+rot").quantize(torch.randn(16, 64, generator=g), None)
    lin = TrainableLinear(p, None)
    x = torch.randn(3, 64, generator=g)
    calls = []
    build = lin.view.weight
    lin.view.weight = lambda: (calls.append(1), build())[1]  # type: ignore[method-assign]
    with torch.no_grad(), reused_weights(lin):
        y0 = lin(x)
        assert torch.equal(lin(x), y0) and len(calls) == 1
        lin.view.conts()[0].delta.add_(0.05)  # what an optimizer step does
        y1 = lin(x)
        assert len(calls) == 2 and not torch.equal(y1, y0)
        lin.view.snap_()  # base changes, delta back to 0
        assert torch.equal(lin(x), x @ build().T)
        assert len(calls) == 3
    assert lin._cache is None
    with torch.no_grad():
        lin(x), lin(x)
    assert len(calls) == 5


def test_nearest_from_a_guess_equals_the_full_search() -> None:
    from salomi.quantizers.vq import _nearest
    from salomi.recovery.trainable import nearest_from

    g = torch.Generator().manual_seed(3)
    for k, d in ((16, 2), (256, 4), (2, 1)):
        cb = torch.randn(k, d, generator=g)
        x = torch.randn(5000, d, generator=g)
        full = _nearest(x, cb)
        for guess in (full, torch.randint(0, k, (5000,), generator=g), torch.zeros(5000, dtype=torch.long)):
            near = cb[full] + 0.01 * torch.randn(5000, d, generator=g)  # rows near a centroid pass the test
            assert torch.equal(nearest_from(x, cb, guess), full)
            assert torch.equal(nearest_from(near, cb, guess), _nearest(near, cb))


@pytest.mark.parametrize("tied", [True, False])
def test_packed_embeddings_train_keep_layout_and_resume(tied: bool, tiny_llama_dir: Path, untied_llama_dir: Path,
                                                        austen_slice: Path, tmp_path: Path) -> None:
    """A packed embedding table (tied head or not) trains in the end-to-end stage: its scales
    change, its layout and the file's model bpw do not, the starting point is the file's exact
    model, --freeze-embed keeps its bytes, and an interrupted run resumes to the same curve."""
    from salomi import api

    src = tmp_path / "e.salomi"
    api.quantize(model=str(tiny_llama_dir if tied else untied_llama_dir), method="rtn:2:g32", embed="rtn:3:g32",
                 out=src, progress=False)
    a = load_quantized(src)
    assert len(a.embeddings) == (1 if tied else 2)
    kw = dict(steps=5, block_steps=0, calib=str(austen_slice), lr=3e-3, ckpt_every=100, **SMALL)
    frozen = run_recover(src, tmp_path / "frozen.salomi", train_embed=False, **kw)
    full = run_recover(src, tmp_path / "full.salomi", **kw)
    assert full["calib_kl_before"] == pytest.approx(frozen["calib_kl_before"], rel=1e-6, abs=1e-9)
    assert full["calib_kl_after"] < full["calib_kl_before"]
    assert full["views"]["embedding table"]["grid"]["layers"] == len(a.embeddings)
    ca, cf, cb = (container.load(p) for p in (src, tmp_path / "frozen.salomi", tmp_path / "full.salomi"))
    table = [n for n in ca.entries if any(n.startswith(f"q/{e}/") for e in a.embeddings)]
    assert table and all(np.array_equal(ca.tensors[n], cf.tensors[n]) for n in table)
    assert any(not np.array_equal(ca.tensors[n], cb.tensors[n]) for n in table if n.endswith("/scale"))
    for n, e in ca.entries.items():
        assert (e["dtype"], e["shape"], e["offsets"]) == (cb.entries[n]["dtype"], cb.entries[n]["shape"],
                                                          cb.entries[n]["offsets"])
    b = load_quantized(tmp_path / "full.salomi")
    assert b.linear_bpw == a.linear_bpw and sorted(b.embeddings) == sorted(a.embeddings)
    # model bpw grows only by the JSON header's recovery record; the data section is identical in size
    assert (tmp_path / "full.salomi").stat().st_size - _header(tmp_path / "full.salomi") == src.stat().st_size - _header(src)
    # The written file computes what training ended at (the KL after is measured on the repacked file).
    rows = api.evaluate_files([tmp_path / "full.salomi"], text=str(austen_slice), seq_len=32, windows=1, progress=False)
    assert rows[0]["ppl"] > 0
    _assert_resumes(src, tmp_path / "part.salomi", kw, full, cb, table, stop_after=3)


def test_reference_hidden_states_cached_per_segment(packed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-to-end loss reads the reference's last hidden states from a per-segment cache:
    the same loss as computing them on the batch, each segment computed once, and no cache
    past REF_CACHE_BYTES."""
    from salomi.api import reference_for
    from salomi.recovery import distill

    qf = load_quantized(packed)
    ref = reference_for(qf, None)
    ref.model.eval()
    segs = torch.randint(0, 200, (6, 16), generator=torch.Generator().manual_seed(0))
    cfg = distill.recovery_config(steps=3, block_steps=0, segments=6, seg_len=16, batch=2)
    rec = distill.Recovery(qf, ref, segs, cfg, torch.device("cpu"))
    seen: set[int] = set()
    for s in range(3):
        idx = distill.batch_indices(6, 2, 0, rec.n_blocks, s)
        seen |= set(idx.tolist())
        with torch.no_grad():
            got = rec.loss("e2e", -1, s)
            want = distill.kl_loss(rec.model, ref.model, segs[idx])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert set(rec._ref_h) == seen
    monkeypatch.setattr(distill, "REF_CACHE_BYTES", 0)
    assert rec.ref_hidden(torch.tensor([0, 1])) is None


def test_recovery_config_checks_settings(packed: Path, tmp_path: Path) -> None:
    from salomi.errors import SalomiError
    from salomi.recovery import distill

    cfg = distill.recovery_config()
    assert set(distill.RESUME_KEYS) <= set(cfg)
    assert distill.recovery_config(segments=11, batch=4)["segments"] == 8
    for bad in ({"steps": -1}, {"block_steps": -1}, {"batch": 0}, {"segments": 3, "batch": 4}, {"code_flip": 1.5}):
        with pytest.raises(SalomiError):
            distill.recovery_config(**bad)
        with pytest.raises(SalomiError):  # run_recover's settings are recovery_config's, checked before any work
            run_recover(packed, tmp_path / "out.salomi", **bad)
    with pytest.raises(TypeError):  # a misspelt setting is an error, not a silent default
        run_recover(packed, tmp_path / "out.salomi", setps=3)


def test_cli_recover_defaults_are_the_apis() -> None:
    from salomi.cli import build_parser, recover_settings
    from salomi.recovery import distill

    a = build_parser().parse_args(["recover", "f.salomi", "--out", "g.salomi"])
    assert distill.recovery_config(**recover_settings(a)) == distill.recovery_config()
    a = build_parser().parse_args(["recover", "f.salomi", "--out", "g.salomi", "--freeze-embed", "--calib-segments", "9"])
    cfg = distill.recovery_config(**recover_settings(a))
    assert cfg["train_embed"] is False and cfg["segments"] == 8


def test_cli_recover_runs_and_keeps_bpw(packed: Path, austen_slice: Path, tmp_path: Path) -> None:
    import json

    from salomi.cli import main

    out, j = tmp_path / "r.salomi", tmp_path / "r.json"
    rc = main(["recover", str(packed), "--out", str(out), "--steps", "2", "--block-steps", "0", "--calib", str(austen_slice),
               "--calib-segments", "4", "--calib-len", "32", "--batch", "2", "--eval-windows", "0", "--json", str(j)])
    res = json.loads(j.read_text())
    assert rc == 0 and res["steps_done"] == 2 and len(res["losses"]) == 2
    assert load_quantized(out).linear_bpw == load_quantized(packed).linear_bpw


def test_files_record_the_commit_their_run_started_on(packed: Path, tiny_llama_dir: Path, austen_slice: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of many minutes records the code it loaded: the commit when it started, not once the work is done
    (here the checkout "moves on" as soon as the calibration text is cut, before any quantizing or training)."""
    from salomi import api
    from salomi.calibration import data

    moved: list[bool] = []
    cut = data.calibration_segments

    def calibration_segments(*a: object, **k: object) -> torch.Tensor:
        moved.append(True)
        return cut(*a, **k)

    monkeypatch.setattr(data, "calibration_segments", calibration_segments)
    monkeypatch.setattr(api, "git_commit", lambda: "later00" if moved else "start000")
    q = tmp_path / "q.salomi"
    api.quantize(model=str(tiny_llama_dir), method="gptq:2:g32", out=q, progress=False, segments=4, seg_len=32,
                calib=str(austen_slice))
    assert moved and load_quantized(q).metadata["quantize"]["git_commit"] == "start000"
    moved.clear()
    out = tmp_path / "r.salomi"
    run_recover(packed, out, steps=1, block_steps=0, calib=str(austen_slice), **SMALL)
    assert moved and load_quantized(out).metadata["recovery"][-1]["git_commit"] == "start000"


def test_recover_command_runs_under_mimalloc_with_the_same_result(packed: Path, austen_slice: Path,
                                                                  tmp_path: Path) -> None:
    """`salomi recover` re-executes itself with mimalloc preloaded (salomi/allocator.py); the training is the
    same bits either way, and SALOMI_ALLOCATOR=system keeps glibc's malloc."""
    import json
    import os
    import subprocess
    import sys

    from salomi.allocator import mimalloc_library

    assert mimalloc_library() is not None, "cmeel-mimalloc (a dependency on Linux) is not installed"
    runs = {}
    for choice in ("default", "system"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SALOMI_ALLOCATOR") and k != "LD_PRELOAD"}
        if choice == "system":
            env["SALOMI_ALLOCATOR"] = "system"
        out, j = tmp_path / f"{choice}.salomi", tmp_path / f"{choice}.json"
        subprocess.run([sys.executable, "-m", "salomi.cli", "recover", str(packed), "--out", str(out), "--steps", "2",
                        "--block-steps", "0", "--calib", str(austen_slice), "--calib-segments", "4", "--calib-len", "32",
                        "--batch", "2", "--eval-windows", "0", "--json", str(j)], env=env, check=True, timeout=300)
        runs[choice] = json.loads(j.read_text())
    assert runs["default"]["allocator"] == "mimalloc" and runs["system"]["allocator"] == "system"
    assert runs["default"]["losses"] == runs["system"]["losses"]
    a, b = load_quantized(tmp_path / "default.salomi"), load_quantized(tmp_path / "system.salomi")
    for name, p in a.packed.items():
        for key, t in p.tensors.items():
            assert np.array_equal(np.asarray(t), np.asarray(b.packed[name].tensors[key])), (name, key)


def test_bf16_body_trains_close_to_float32_and_must_match_on_resume(packed: Path, austen_slice: Path,
                                                                     tmp_path: Path) -> None:
    """--body-dtype bfloat16: the body's matmuls run in bf16 (so the losses are not float32's bits), the
    trained file keeps its bytes, the losses stay within a few percent, and a resume may not switch dtype."""
    from salomi.errors import SalomiError

    runs = {}
    for dt in ("float32", "bfloat16"):
        out = tmp_path / f"{dt}.salomi"
        runs[dt] = run_recover(packed, out, steps=3, block_steps=0, calib=str(austen_slice), body_dtype=dt,
                               stop_after=2 if dt == "bfloat16" else None, **SMALL)
        assert load_quantized(out).linear_bpw == load_quantized(packed).linear_bpw
    f32, b16 = runs["float32"]["losses"], runs["bfloat16"]["losses"]
    assert f32[:2] != b16 and len(b16) == 2
    assert all(abs(a - b) <= 0.05 * a for a, b in zip(f32, b16)), (f32, b16)
    with pytest.raises(SalomiError, match="body_dtype"):
        run_recover(packed, tmp_path / "bfloat16.salomi", steps=3, block_steps=0, calib=str(austen_slice),
                    resume=True, **SMALL)
