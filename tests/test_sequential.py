"""True-sequential quantization: within a block, each group of linears that share an input
gets its Hessian from the block with the groups before it already quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from salomi.calibration.sequential import (
    accumulate_hessians,
    capture_block_inputs,
    input_groups,
    quantize_sequential,
)
from salomi.loading.models import decoder_blocks, linear_names, load_reference
from salomi.quantizers.base import PackedLinear, Quantizer
from salomi.quantizers.spec import parse_method


@pytest.mark.parametrize(("arch", "want"), [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
])
def test_input_groups_follow_the_forward_pass(arch: str, want: list[list[str]], tiny_llama_dir: Path,
                                              tiny_gpt2_dir: Path) -> None:
    ref = load_reference(str(tiny_llama_dir if arch == "llama" else tiny_gpt2_dir))
    blocks = decoder_blocks(ref.model)
    ids = torch.randint(0, 50000, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(ref.model, blocks, ids, batch=2)
    layer = linear_names(ref.model)[1]
    groups = input_groups(blocks[1], layer, *inputs[0])
    prefix = next(iter(layer)).split(".1.")[0] + ".1."
    assert [[n[len(prefix):] for n in g] for g in groups] == want


class Recorder(Quantizer):
    """rtn:2:g32 that keeps the Hessian it was given for every layer."""

    def __init__(self) -> None:
        self.inner = parse_method("rtn:2:g32")
        self.seen: dict[int, torch.Tensor] = {}
        self.spec = self.inner.spec

    needs_hessian = True

    def check_shape(self, shape: tuple[int, int]) -> None:
        self.inner.check_shape(shape)

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> PackedLinear:
        self.seen[len(self.seen)] = hessian.clone()
        return self.inner.quantize(w)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_down_proj_hessian_sees_the_quantized_block(tiny_llama_dir: Path, true_sequential: bool) -> None:
    ids = torch.randint(0, 50000, (4, 24), generator=torch.Generator().manual_seed(1))
    ref = load_reference(str(tiny_llama_dir))
    float_model = load_reference(str(tiny_llama_dir)).model
    rec = Recorder()
    names = linear_names(ref.model)
    order = [n for layer in names.values() for n in layer]
    quantize_sequential(ref.model, lambda _n: rec, ids, batch=2, progress=False, true_sequential=true_sequential)
    down0 = order.index(next(n for n in names[0] if n.endswith("down_proj")))
    got = rec.seen[down0]

    def down_hessian(model: torch.nn.Module) -> torch.Tensor:
        blocks = decoder_blocks(model)
        inputs = capture_block_inputs(model, blocks, ids, batch=2)
        down = {n: m for n, m in linear_names(model)[0].items() if n.endswith("down_proj")}
        with accumulate_hessians(down) as hs, torch.no_grad():
            for args, kwargs in inputs:
                blocks[0](*args, **kwargs)
        return next(iter(hs.values()))

    # Block 0 of the quantized model, but with down_proj (and what follows) irrelevant to its input.
    quantized_block = down_hessian(ref.model)
    from_float = down_hessian(float_model)
    assert not torch.allclose(quantized_block, from_float, rtol=1e-3, atol=1e-5)
    if true_sequential:
        torch.testing.assert_close(got, quantized_block, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(got, from_float, rtol=1e-5, atol=1e-6)


class _Shared(torch.nn.Module):
    """a and b read the same tensor (as q/k/v do), c another; `split` feeds b a copy from call 2 on."""

    def __init__(self, split: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(6, 3), torch.nn.Linear(6, 2), torch.nn.Linear(3, 4)
        self.split, self.calls = split, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.a(x)
        self.b(x.clone() if self.split and self.calls > 1 else x)
        return self.c(y)


def test_hessians_of_linears_on_one_tensor_are_shared_exactly() -> None:
    torch.manual_seed(0)
    m, xs = _Shared(), [torch.randn(5, 6) for _ in range(3)]
    with accumulate_hessians({"a": m.a, "b": m.b, "c": m.c}) as hs, torch.no_grad():
        for x in xs:
            m(x)
    want_ab, want_c = torch.zeros(6, 6), torch.zeros(3, 3)
    for x in xs:
        want_ab.addmm_(x.t(), x)
        y = m.a(x).detach()
        want_c.addmm_(y.t(), y)
    assert torch.equal(hs["a"], want_ab * (2.0 / 15)) and torch.equal(hs["b"], hs["a"])
    assert hs["b"].data_ptr() != hs["a"].data_ptr()  # a copy: a quantizer may damp one in place
    torch.testing.assert_close(hs["c"], want_c * (2.0 / 15))


def test_hessian_sharing_that_breaks_between_passes_raises() -> None:
    m = _Shared(split=True)
    with pytest.raises(RuntimeError, match="cannot be shared"), torch.no_grad():
        with accumulate_hessians({"a": m.a, "b": m.b}):
            for _ in range(2):
                m(torch.randn(4, 6))
