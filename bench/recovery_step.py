"""Time end-to-end distillation steps of `salomi recover` on a packed file.

Builds the same Recovery the CLI builds (end-to-end stage, every stored value trainable,
embedding table included), runs --warmup steps, then --steps timed steps, and prints per
step: wall seconds, user and system CPU seconds, minor page faults (the allocator's cost:
under glibc every tensor of 1 MB or more is a fresh mapping) and the loss; then the median step time
and the peak resident memory. The malloc is the CLI's: mimalloc (re-executed; SALOMI_ALLOCATOR=system for glibc's, with map_large_allocations).

    python bench/recovery_step.py FILE [--steps 4] [--warmup 1] [--segments 64] [--batch 4] [--body-dtype bfloat16] [--json OUT]

Run it at two commits on a quiet machine to compare step times (docs/RESULTS.md, "recover").
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salomi.allocator import active_allocator, reexec_under_mimalloc  # noqa: E402
from salomi.api import map_large_allocations, peak_rss_mb  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--segments", type=int, default=64)
    ap.add_argument("--seg-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--body-dtype", default="float32", help="float32 or bfloat16 (recovery_config checks it)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if argv is None:  # as `salomi recover` runs: under mimalloc unless SALOMI_ALLOCATOR=system
        reexec_under_mimalloc("bench/recovery_step.py")
    map_large_allocations()

    import torch

    from salomi.api import reference_for
    from salomi.calibration.data import calibration_segments
    from salomi.data.texts import load_text
    from salomi.evaluation.evaluate import tokenize
    from salomi.packing.model_file import load_quantized
    from salomi.recovery.distill import Recovery, recovery_config

    qf = load_quantized(a.file)
    ref = reference_for(qf, None)
    ref.model.eval()
    cfg = recovery_config(steps=a.warmup + a.steps, block_steps=0, segments=a.segments, seg_len=a.seg_len, batch=a.batch,
                          body_dtype=a.body_dtype)
    segs = calibration_segments(tokenize(ref.tokenizer, load_text(cfg["calib"])), cfg["segments"], cfg["seg_len"],
                                cfg["seed"], cfg["calib"])
    rec = Recovery(qf, ref, segs, cfg, torch.device("cpu"))
    opt = rec.optimizer("e2e", -1)
    rows = []
    for s in range(a.warmup + a.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = rec.loss("e2e", -1, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        row = {"step": s, "warmup": s < a.warmup, "seconds": round(time.perf_counter() - t0, 2),
               "user": round(r1.ru_utime - r0.ru_utime, 2), "sys": round(r1.ru_stime - r0.ru_stime, 2),
               "minor_faults_M": round((r1.ru_minflt - r0.ru_minflt) / 1e6, 2), "loss": round(loss.item(), 5)}
        rows.append(row)
        print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    timed = [r["seconds"] for r in rows if not r["warmup"]]
    out = {"file": a.file, "threads": torch.get_num_threads(), "body_dtype": a.body_dtype, "segments": a.segments, "batch": a.batch,
           "seg_len": a.seg_len, "steps": rows, "median_step_s": statistics.median(timed) if timed else None,
           "peak_rss_mb": round(peak_rss_mb()), "allocator": active_allocator()}
    print(f"median step {out['median_step_s']} s over {len(timed)} steps; peak RSS {out['peak_rss_mb']} MB; "
          f"{out['allocator']} malloc")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
