"""The method table: every --method name, its arguments and its quantizer."""

from __future__ import annotations

from salomi.quantizers.base import Quantizer
from salomi.quantizers.simple import BinaryQuantizer, RTNQuantizer, TernaryQuantizer
from salomi.quantizers.spec import int_arg, register_method, register_wrapper


@register_method("binary", "binary[:gG]", "sign x fp16 scale per row (or per group of G): ~1 bit")
def _binary(spec: str, *args: str) -> Quantizer:
    if len(args) > 1:
        raise TypeError
    return BinaryQuantizer(int_arg(spec, args[0], "g") if args else None)


@register_method("ternary", "ternary[:gG]", "{-a,0,+a} packed 5 per byte + fp16 scale per row/group: ~1.6 bits")
def _ternary(spec: str, *args: str) -> Quantizer:
    if len(args) > 1:
        raise TypeError
    return TernaryQuantizer(int_arg(spec, args[0], "g") if args else None)


@register_method("rtn", "rtn:K:gG", "round-to-nearest, K=1..4 bits, groups of G with fp16 scale and zero")
def _rtn(spec: str, bits: str, group: str) -> Quantizer:
    return RTNQuantizer(int_arg(spec, bits, "", 1, 8), int_arg(spec, group, "g"))


@register_method(
    "gptq",
    "gptq:K:gG[:act]",
    "GPTQ error feedback (needs Hessian); also gptq:binary[:gG][:act], gptq:ternary[:gG][:act]",
)
def _gptq(spec: str, *args: str) -> Quantizer:
    from salomi.quantizers.gptq import parse_gptq

    return parse_gptq(spec, *args)


@register_method(
    "vq",
    "vq:dD:kK[:noft]",
    "Hessian-weighted k-means VQ of d-vectors, GPTQ-style feedback (needs Hessian): log2(k)/d bits + codebook",
)
def _vq(spec: str, *args: str) -> Quantizer:
    from salomi.quantizers.vq import parse_vq

    return parse_vq(spec, *args)


@register_wrapper(
    "lowrank",
    "lowrank:rR",
    "add an int8 rank-R U.V fit to the Hessian-weighted residual of the base (+~8R(out+in)/(out*in) bits)",
)
def _lowrank(spec: str, base: Quantizer, *args: str) -> Quantizer:
    from salomi.quantizers.lowrank import wrap_lowrank

    return wrap_lowrank(spec, base, *args)


@register_method(
    "billm",
    "billm[:sN]",
    "BiLLM: salient columns residual-binarized, rest split in 2 binarized groups, GPTQ feedback (needs Hessian): ~2.1 bits",
)
def _billm(spec: str, *args: str) -> Quantizer:
    from salomi.quantizers.billm import parse_billm

    return parse_billm(spec, *args)


@register_method(
    "pbllm",
    "pbllm:F[:fp16][:noft]",
    "PB-LLM: fraction F of salient weights int8 (or fp16) stored sparsely, rest binary, GPTQ feedback (needs Hessian)",
)
def _pbllm(spec: str, *args: str) -> Quantizer:
    from salomi.quantizers.pbllm import parse_pbllm

    return parse_pbllm(spec, *args)


@register_wrapper(
    "ls",
    "ls",
    "learned scales: refit the base's fp16 scales/zeros to minimise tr(dW H dW^T), codes fixed (no bpw change)",
)
def _ls(spec: str, base: Quantizer, *args: str) -> Quantizer:
    from salomi.quantizers.scales import wrap_ls

    return wrap_ls(spec, base, *args)


@register_wrapper(
    "rot",
    "rot[:sS]",
    "incoherence: quantize U.W.V^T (randomized Hadamard U, V from seed S) against V.H.V^T; no stored bytes",
)
def _rot(spec: str, base: Quantizer, *args: str) -> Quantizer:
    from salomi.quantizers.rotation import wrap_rot

    return wrap_rot(spec, base, *args)


def _register_all_formats() -> None:
    # Reading a file must know every storage format, even ones whose method was never parsed
    # in this process (the factories above import their modules lazily).
    from salomi.quantizers import billm, gptq, lowrank, pbllm, rotation, scales, vq  # noqa: F401


_register_all_formats()
