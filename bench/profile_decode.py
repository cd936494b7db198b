"""Where a decoded token's time goes in the native engine: ms per token per stage.

    python bench/profile_decode.py FILE [FILE ...] [--activations float|int8] [--tokens 128]
                                   [--threads 2] [--rounds 3] [--json OUT]

Each file runs in this process with SALOMI_ENGINE_PROFILE=1 (wall clock per stage, the
engine's own timers around every stage of forward_chunk): a 128-token prompt, then
--tokens greedy decode steps, repeated --rounds times with the stage timers read before
and after the decode loop only. "other" = the decode wall time not inside any stage
(Python call, logits copy, argmax). Printed with the weight bytes each stage reads per
token so a stage's effective GB/s can be compared with the copy bandwidth of
bench_kernels.py. The best round (lowest total) is reported: a shared VM's noise only
ever adds time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["SALOMI_ENGINE_PROFILE"] = "1"

import torch  # noqa: E402

from salomi.packing.model_file import load_quantized  # noqa: E402
from salomi.runtime.engine import PROFILE_NESTED, PROFILE_STAGES, Engine  # noqa: E402

STAGE_LAYERS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                "down": ("down_proj",)}


def stage_bytes(qf) -> dict[str, int]:  # noqa: ANN001
    """Packed weight bytes each stage reads per token (head: the tied/untied head tensor)."""
    out = dict.fromkeys(STAGE_LAYERS, 0)
    for name, p in qf.packed.items():
        for stage, suffixes in STAGE_LAYERS.items():
            if name.endswith(suffixes):
                out[stage] += p.nbytes
    for name in ("lm_head", "model.embed_tokens"):  # an untied head wins over the tied table
        if name in qf.embeddings:
            out["head"] = qf.embeddings[name].nbytes
            break
        if name + ".weight" in qf.floats:
            out["head"] = qf.floats[name + ".weight"].nbytes
            break
    return out


def profile_file(path: str, activations: str, tokens: int, threads: int, rounds: int) -> dict:
    qf = load_quantized(path)
    eng = Engine.from_file(qf, max_seq=128 + tokens + 8, threads=threads, activations=activations)
    ids = torch.randint(100, 20000, (128,), generator=torch.Generator().manual_seed(0))
    best = None
    for _ in range(rounds):
        logits = eng.forward(ids, pos=0)
        before = eng.profile()
        nxt = int(logits.argmax())
        t0 = time.perf_counter()
        for _ in range(tokens):
            nxt = int(eng.forward([nxt]).argmax())
        wall = time.perf_counter() - t0
        after = eng.profile()
        stages = {s: (after[s] - before[s]) / tokens * 1e3 for s in PROFILE_STAGES if s not in PROFILE_NESTED}
        stages["other"] = wall / tokens * 1e3 - sum(stages.values())
        rot = (after.get("rot", 0.0) - before.get("rot", 0.0)) / tokens * 1e3
        if best is None or wall < best[0]:
            best = (wall, stages, rot)
    wall, stages, rot = best
    return {"file": path, "activations": activations, "threads": threads, "tokens": tokens,
            "decode_tok_s": tokens / wall, "ms_per_token": stages, "rot_ms_inside_stages": rot,
            "stage_bytes": stage_bytes(qf), "int8_layers": eng.int8_layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--activations", default="float", choices=["float", "int8"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for f in args.files:
        if not os.path.exists(f):
            sys.exit(f"error: {f} does not exist; give a .salomi file written by `salomi quantize`")
        r = profile_file(f, args.activations, args.tokens, args.threads, args.rounds)
        rows.append(r)
        ms, nb = r["ms_per_token"], r["stage_bytes"]
        print(f"{f} [{args.activations}]: {r['decode_tok_s']:.1f} tok/s, {sum(ms.values()):.3f} ms/token")
        for s, t in ms.items():
            gbs = f"{nb[s] / (t * 1e-3) / 1e9:6.1f} GB/s of {nb[s] / 1e6:6.2f} MB" if nb.get(s) and t > 0 else ""
            print(f"  {s:8} {t:7.3f} ms {100 * t / sum(ms.values()):5.1f}%  {gbs}")
        if r["rot_ms_inside_stages"]:
            print(f"  (+rot transforms, inside the projection stages: {r['rot_ms_inside_stages']:.3f} ms)")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
