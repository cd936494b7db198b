"""Mixed precision under a bit budget: the allocator against brute force on synthetic tables,
exact budgets, unreachable targets, and end to end on the tiny Llama (budget met as measured
from the written file, recipe stored in its metadata)."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch

from salomi import api
from salomi.errors import SalomiError
from salomi.loading.models import linear_names, load_reference
from salomi.mixed import allocate, byte_range, make_plan, sensitivity_table, validate_proxy
from salomi.mixed.plan import fixed_file_bytes
from salomi.packing.model_file import load_quantized

# Rows of the tiny Llama are 64/192 wide; a fine ladder of sizes so a budget can be filled to within 0.01 bpw.
TINY_CANDIDATES = ["binary", "gptq:binary", "gptq:binary:g32", "gptq:ternary", "gptq:ternary:g32",
                   "gptq:2:g64", "gptq:2:g32", "gptq:3:g64", "gptq:3:g32", "gptq:4:g32"]
CALIB = {"segments": 4, "seg_len": 64, "seed": 0}


def _random_costs(rng: random.Random, layers: int, choices: int, unit: int = 1) -> dict:
    costs = {}
    for i in range(layers):
        opts = {}
        for j in range(choices):
            b = unit * rng.randint(1, 40)
            opts[f"m{j}"] = (b, rng.uniform(0, 10) / (1 + b / 10))
        costs[f"l{i}"] = opts
    return costs


def _brute(costs: dict, budget: int) -> float:
    names = list(costs)
    best = math.inf
    for combo in itertools.product(*(list(costs[n].values()) for n in names)):
        if sum(b for b, _ in combo) <= budget:
            best = min(best, sum(d for _, d in combo))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocator_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    costs = _random_costs(rng, rng.randint(1, 8), 3, unit=rng.choice([1, 2, 8]))
    lo, hi = byte_range(costs)
    for budget in sorted({lo, hi, rng.randint(lo, hi), rng.randint(lo, hi), (lo + hi) // 2}):
        a = allocate(costs, budget)
        assert a.bytes <= budget
        assert a.bytes == sum(costs[n][c][0] for n, c in a.choice.items())
        assert a.exact
        assert a.damage == pytest.approx(_brute(costs, budget), rel=1e-12, abs=1e-12)


def test_allocator_coarse_units_stay_feasible_and_near_optimal() -> None:
    """With too few DP states for exact units, costs round up: never over budget, barely worse."""
    rng = random.Random(7)
    costs = _random_costs(rng, 8, 3, unit=1)
    lo, hi = byte_range(costs)
    for budget in range(lo, hi + 1, 7):
        a = allocate(costs, budget, max_states=20)
        assert a.bytes <= budget
        opt = _brute(costs, budget)
        assert a.damage <= opt * 1.25 + 1e-9


def test_allocator_large_table_never_exceeds_budget() -> None:
    rng = random.Random(3)
    costs = {f"l{i}": {f"m{j}": (rng.randint(10_000, 400_000), rng.random()) for j in range(10)} for i in range(200)}
    lo, hi = byte_range(costs)
    for budget in (lo, lo + 1, (lo + hi) // 3, hi - 1, hi):
        a = allocate(costs, budget)
        assert a.bytes <= budget
        if budget == hi:
            assert a.damage == pytest.approx(sum(min(d for _, d in c.values()) for c in costs.values()))


def test_allocator_below_cheapest_errors() -> None:
    costs = {"a": {"x": (10, 1.0), "y": (20, 0.5)}, "b": {"x": (10, 1.0)}}
    with pytest.raises(SalomiError, match="20..30"):
        allocate(costs, 19)


@pytest.fixture(scope="module")
def tiny_ref(tiny_llama_dir: Path):
    return load_reference(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def table(tiny_ref, austen_slice: Path):
    return sensitivity_table(tiny_ref, TINY_CANDIDATES, calib=str(austen_slice), progress=False, cache=False,
                             **CALIB)


def test_sensitivity_table_is_sane(table: dict, tiny_ref) -> None:
    from salomi.quantizers.spec import parse_method

    assert len(table["layers"]) == 14
    for e in table["layers"].values():
        ch = e["choices"]
        assert set(ch) == set(TINY_CANDIDATES)
        # more bits -> less damage, and exact bytes
        assert ch["gptq:4:g32"]["damage"] < ch["gptq:2:g32"]["damage"] < ch["binary"]["damage"]
        assert ch["gptq:binary"]["damage"] <= ch["binary"]["damage"] * 1.0001
        o, i = e["shape"]
        assert ch["binary"]["bytes"] == parse_method("binary").quantize(torch.ones(o, i)).nbytes


def test_sensitivity_cache_reuses_and_extends(tiny_ref, austen_slice: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALOMI_CACHE", str(tmp_path))
    t1 = sensitivity_table(tiny_ref, ["binary", "gptq:2:g32"], calib=str(austen_slice), progress=False, **CALIB)
    files = list((tmp_path / "mixed").glob("sens-*.json"))
    assert len(files) == 1
    # a superset of candidates computes only the new one; the old entries are reused as stored
    t2 = sensitivity_table(tiny_ref, ["binary", "gptq:2:g32", "gptq:3:g32"], calib=str(austen_slice),
                           progress=False, **CALIB)
    assert list((tmp_path / "mixed").glob("sens-*.json")) == files
    for n, e in t1["layers"].items():
        assert e["choices"]["binary"] == t2["layers"][n]["choices"]["binary"]
        assert "gptq:3:g32" in t2["layers"][n]["choices"]


@pytest.mark.parametrize("target", [1.3, 2.2, 3.1])
def test_end_to_end_linear_budget(tiny_ref, tiny_llama_dir: Path, table: dict, austen_slice: Path,
                                  tmp_path: Path, target: float) -> None:
    plan = make_plan(tiny_ref, target_linear_bpw=target, table=table, damage="damage", progress=False)
    assert plan.predicted_linear_bpw <= target
    out = tmp_path / "m.salomi"
    api.quantize(model=str(tiny_llama_dir), method="gptq:2:g32", recipe=plan.recipe, out=out,
                 calib=str(austen_slice), progress=False, reference=tiny_ref, **CALIB)
    qf = load_quantized(out)
    assert qf.linear_bytes == plan.linear_bytes  # bytes depend only on shape and method
    assert target - 0.01 <= qf.linear_bpw <= target
    assert qf.metadata["recipe"]["layers"] == plan.recipe
    assert len(set(plan.recipe.values())) >= 2  # genuinely mixed


def test_end_to_end_model_budget(tiny_ref, tiny_llama_dir: Path, table: dict, austen_slice: Path,
                                 tmp_path: Path) -> None:
    fixed = fixed_file_bytes(tiny_ref, "float16", {"text": str(austen_slice), **CALIB})
    params = sum(p.numel() for p in tiny_ref.model.parameters())
    lo, hi = byte_range({n: {c: (ch["bytes"], 0.0) for c, ch in e["choices"].items()}
                         for n, e in table["layers"].items()})
    target = round((fixed + (lo + hi) / 2) * 8 / params, 4)
    plan = make_plan(tiny_ref, target_model_bpw=target, table=table, damage="damage", progress=False, calib=str(austen_slice),
                     **CALIB)
    out = tmp_path / "m.salomi"
    api.quantize(model=str(tiny_llama_dir), method="gptq:2:g32", recipe=plan.recipe, out=out,
                 calib=str(austen_slice), progress=False, reference=tiny_ref, **CALIB)
    qf = load_quantized(out)
    assert qf.model_bpw <= plan.predicted_model_bpw <= target
    assert qf.model_bpw >= target - 0.01


def test_unreachable_targets_name_the_range(tiny_ref, table: dict) -> None:
    with pytest.raises(SalomiError, match=r"feasible linear bpw range is 1\.\d{4}\.\.5\.0000") as e:
        make_plan(tiny_ref, target_linear_bpw=0.9, table=table, damage="damage", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(SalomiError, match="feasible linear bpw range"):
        make_plan(tiny_ref, target_linear_bpw=9.0, table=table, damage="damage", progress=False)
    with pytest.raises(SalomiError, match="feasible model bpw range"):
        make_plan(tiny_ref, target_model_bpw=1.0, table=table, damage="damage", progress=False)
    with pytest.raises(SalomiError, match="exactly one target"):
        make_plan(tiny_ref, table=table, damage="damage", progress=False)


def test_proxy_tracks_true_kl(tiny_ref, austen_slice: Path, brown_slice: Path) -> None:
    """Single-layer quantization: the damage proxy ranks methods like the measured KL does."""
    names = list(linear_names(tiny_ref.model)[0])[:3]
    r = validate_proxy(tiny_ref, names, ["binary", "gptq:2:g32", "gptq:4:g32"], calib=str(austen_slice),
                       eval_text=str(brown_slice), eval_windows=2, eval_seq_len=64, **CALIB)
    assert len(r["rows"]) == 9 and all(x["kl"] > -1e-6 for x in r["rows"])
    for n in names:  # within a layer, more damage means more KL
        rows = sorted((x for x in r["rows"] if x["layer"] == n), key=lambda x: x["damage"])
        assert rows[0]["kl"] <= rows[-1]["kl"]
    assert r["spearman_damage"] > 0.3


def test_kl_damage_table(tiny_ref, austen_slice: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """damage="kl": each (layer, candidate) gets the measured KL of quantizing that layer alone, equal to
    a direct measurement; a cached proxy-only table is extended with KLs; the plan minimises their sum."""
    import torch.nn.functional as F

    from salomi.calibration.sequential import _set_weight
    from salomi.loading.models import linear_weight
    from salomi.mixed.sensitivity import KLProbe, calibration_tokens, table_costs
    from salomi.quantizers.spec import parse_method

    monkeypatch.setenv("SALOMI_CACHE", str(tmp_path))
    cands = ["binary", "gptq:4:g32"]
    proxy = sensitivity_table(tiny_ref, cands, calib=str(austen_slice), progress=False, **CALIB)
    with pytest.raises(SalomiError, match="no measured KL"):
        table_costs(proxy, "kl")
    t = sensitivity_table(tiny_ref, cands, calib=str(austen_slice), progress=False, kl_segments=2, kl_seg_len=32,
                          **CALIB)
    assert len(list((tmp_path / "mixed").glob("sens-*.json"))) == 1
    for n, e in t["layers"].items():
        assert e["choices"]["gptq:4:g32"]["kl"] < e["choices"]["binary"]["kl"], n
        assert e["choices"]["binary"]["damage"] == proxy["layers"][n]["choices"]["binary"]["damage"]
    # the stored KL is what a direct swap of that layer measures
    model = tiny_ref.model
    name = next(iter(t["layers"]))
    mod = model.get_submodule(name)
    w = linear_weight(mod).detach().clone()
    segs = calibration_tokens(tiny_ref.tokenizer, str(austen_slice), 2, 32, CALIB.get("seed", 0) + 1)
    with torch.no_grad():
        ref = F.log_softmax(model(segs).logits.float(), -1)
        _set_weight(mod, parse_method("binary").quantize(w.float()).dequantize())
        lq = F.log_softmax(model(segs).logits.float(), -1)
        _set_weight(mod, w)
    direct = float((ref.exp() * (ref - lq)).sum() / (ref.numel() / ref.shape[-1]))
    assert t["layers"][name]["choices"]["binary"]["kl"] == pytest.approx(direct, rel=1e-3)
    assert KLProbe(model, segs).kl_with(mod, w) == pytest.approx(0.0, abs=1e-6)
    plan = make_plan(tiny_ref, target_linear_bpw=2.5, table=t, damage="kl", progress=False)
    costs = table_costs(t, "kl")
    assert plan.damage == pytest.approx(sum(costs[n][c][1] for n, c in plan.recipe.items()))
    assert plan.predicted_linear_bpw <= 2.5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kl_probe_from_the_block_equals_the_full_pass(arch: str, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    """A probe that replays the kept input of the layer's block gives the full pass's KL, and puts the
    model back as it was."""
    from salomi.loading.models import decoder_blocks, linear_weight
    from salomi.mixed.sensitivity import KLProbe

    ref = load_reference(str(tiny_llama_dir if arch == "llama" else tiny_gpt2_dir))
    model = ref.model
    segs = torch.randint(0, 50000, (3, 24), generator=torch.Generator().manual_seed(2))
    probe = KLProbe(model, segs, batch=2)
    blocks = list(decoder_blocks(model))
    for name, mod in linear_names(model)[1].items():
        w = linear_weight(mod).detach().clone()
        q = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * float(w.abs().max()) * 20
        full = probe.kl_with(mod, q)
        fast = probe.kl_with(mod, q, block=1)
        assert full > 1e-5, name
        assert fast == pytest.approx(full, rel=1e-5), name
        assert torch.equal(linear_weight(mod), w)
    assert list(decoder_blocks(model)) == blocks
    assert probe.kl_with(mod, w, block=1) == pytest.approx(0.0, abs=1e-6)


def test_default_candidates_parse_and_fit_the_default_models_shapes() -> None:
    from salomi.mixed import DEFAULT_CANDIDATES
    from salomi.quantizers.spec import parse_method

    assert len(set(DEFAULT_CANDIDATES)) == len(DEFAULT_CANDIDATES) >= 2
    for spec in DEFAULT_CANDIDATES:
        q = parse_method(spec)
        for shape in ((576, 576), (192, 576), (1536, 576), (576, 1536)):  # SmolLM2-135M's q/o, k/v, gate/up, down
            q.check_shape(shape)


def test_model_budget_chooses_the_embedding(tiny_ref, tiny_llama_dir: Path, austen_slice: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--model-bpw with several --embed choices: each choice's table KL is measured (and cached), the
    linears get the best allocation of what each leaves, and the least total KL wins; the written file
    uses that choice and meets the target; several choices without --model-bpw are refused."""
    from salomi.mixed.sensitivity import embedding_damage

    monkeypatch.setenv("SALOMI_CACHE", str(tmp_path))
    cands = ["binary", "gptq:2:g32", "gptq:4:g32"]
    kl = embedding_damage(tiny_ref, ["none", "rtn:2:g32", "rtn:4:g32"], calib=str(austen_slice), progress=False,
                          **CALIB)
    assert kl["none"] == 0.0 and 0.0 < kl["rtn:4:g32"] < kl["rtn:2:g32"]
    assert len(list((tmp_path / "mixed").glob("sens-embed-*.json"))) == 1
    # The tiny model is mostly embedding (50257 x 64): float16 costs ~15 model bpw, so a target in the
    # 4-bit table's range is out of reach with "none" and leaves bytes unspent with the 2-bit table.
    choices = "none,rtn:2:g32,rtn:4:g32"
    params = sum(p.numel() for p in tiny_ref.model.parameters())
    lo, hi = byte_range({n: {c: (ch["bytes"], 0.0) for c, ch in e["choices"].items()}
                         for n, e in sensitivity_table(tiny_ref, cands, calib=str(austen_slice), progress=False,
                                                       **CALIB)["layers"].items()})
    fixed = fixed_file_bytes(tiny_ref, "float16", {"text": str(austen_slice), **CALIB}, "rtn:4:g32")
    target = round((fixed + (lo + hi) / 2) * 8 / params, 4)
    plan = make_plan(tiny_ref, target_model_bpw=target, candidates=cands, embed=choices, damage="kl", progress=False,
                     calib=str(austen_slice), **CALIB)
    assert set(plan.embed_choices) == {"rtn:2:g32", "rtn:4:g32"}
    assert plan.embed == min(plan.embed_choices, key=plan.embed_choices.__getitem__)
    assert plan.embed_choices[plan.embed] == pytest.approx(plan.damage + kl[plan.embed])
    out = tmp_path / "m.salomi"
    api.quantize(model=str(tiny_llama_dir), out=out, calib=str(austen_slice), progress=False, reference=tiny_ref,
                 target_model_bpw=target, candidates=cands, embed=choices, **CALIB)
    qf = load_quantized(out)
    assert qf.metadata["recipe"]["embeddings"] == plan.embed and qf.embeddings
    assert set(qf.metadata["recipe"]["budget"]["embed_choices"]) == set(plan.embed_choices)
    assert plan.embed == "rtn:4:g32" and target - 0.01 <= qf.model_bpw <= target
    with pytest.raises(SalomiError, match="need --model-bpw"):
        make_plan(tiny_ref, target_linear_bpw=2.0, candidates=cands, embed=choices, progress=False,
                  calib=str(austen_slice), **CALIB)
    with pytest.raises(SalomiError, match=r"--embed none,rtn.*feasible model bpw range"):
        make_plan(tiny_ref, target_model_bpw=1.0, candidates=cands, embed=choices, progress=False,
                  calib=str(austen_slice), **CALIB)
    with pytest.raises(SalomiError, match="budget to choose"):
        api.quantize(model=str(tiny_llama_dir), method="binary", out=tmp_path / "x.salomi", embed=choices,
                     progress=False, reference=tiny_ref, **CALIB)
