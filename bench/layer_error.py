"""Per-layer relative output error of methods on the default model's real layers.

For the chosen blocks, every linear's Hessian H = 2/n sum x x^T is accumulated from the
float model on Austen calibration segments, and each method's error
tr(dW H dW^T) / tr(W H W^T) is printed (a diagnostic: the headline is perplexity).

    python bench/layer_error.py gptq:binary,gptq:binary+rot 0,14 [--segments 16]
"""

from __future__ import annotations

import argparse

import torch

from salomi.api import _text_ids
from salomi.calibration.data import calibration_segments
from salomi.calibration.sequential import accumulate_hessians, block_output, capture_block_inputs
from salomi.loading.models import decoder_blocks, linear_names, linear_weight, load_reference
from salomi.quantizers.gptq import weighted_error
from salomi.quantizers.spec import parse_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("methods", help="comma-separated method specs")
    ap.add_argument("blocks", help="comma-separated block indices")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib", default="austen")
    ap.add_argument("--segments", type=int, default=16)
    a = ap.parse_args()
    methods = a.methods.split(",")
    want = sorted(int(b) for b in a.blocks.split(","))
    torch.set_num_threads(1)
    ref = load_reference(a.model)
    segs = calibration_segments(_text_ids(ref.tokenizer, a.calib), a.segments, 512, 0, a.calib)
    blocks, names = decoder_blocks(ref.model), linear_names(ref.model)
    print("block linear " + " ".join(methods))
    with torch.no_grad():
        inputs = capture_block_inputs(ref.model, blocks, segs, 8)
        for i, block in enumerate(blocks[: want[-1] + 1]):
            if i in want:
                with accumulate_hessians(names[i]) as hs:
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
                for n, m in names[i].items():
                    w, h = linear_weight(m).float(), hs[n]
                    base = float(((w.double() @ h.double()) * w.double()).sum())
                    errs = [weighted_error(w, parse_method(s).quantize(w, h).dequantize(), h) / base for s in methods]
                    print(i, n.rsplit(".", 1)[-1], " ".join(f"{e:.4f}" for e in errs), flush=True)
            inputs = [((block_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]


if __name__ == "__main__":
    main()
