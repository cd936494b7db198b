"""Method specs: the text a user types after --method, parsed into a Quantizer.

Grammar:  SPEC := BASE ('+' WRAPPER)*     BASE, WRAPPER := NAME (':' ARG)*
Each NAME is registered below with a factory and a one-line help; the help lines
make up `salomi quantize --help`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from salomi.errors import SalomiError
from salomi.quantizers.base import Quantizer


@dataclass
class MethodEntry:
    factory: Callable[..., Quantizer]
    usage: str
    help: str


METHODS: dict[str, MethodEntry] = {}
WRAPPERS: dict[str, MethodEntry] = {}


def register_method(name: str, usage: str, help: str) -> Callable[[Callable[..., Quantizer]], Callable[..., Quantizer]]:
    def deco(f: Callable[..., Quantizer]) -> Callable[..., Quantizer]:
        METHODS[name] = MethodEntry(f, usage, help)
        return f

    return deco


def register_wrapper(name: str, usage: str, help: str) -> Callable[[Callable[..., Quantizer]], Callable[..., Quantizer]]:
    """A wrapper factory takes (base: Quantizer, *args) and returns a Quantizer."""

    def deco(f: Callable[..., Quantizer]) -> Callable[..., Quantizer]:
        WRAPPERS[name] = MethodEntry(f, usage, help)
        return f

    return deco


def int_arg(spec: str, arg: str, prefix: str = "", lo: int = 1, hi: int = 1 << 30) -> int:
    m = re.fullmatch(re.escape(prefix) + r"(\d+)", arg)
    if not m or not lo <= int(m.group(1)) <= hi:
        raise SalomiError(f"bad method spec {spec!r}: expected {prefix}N with N in {lo}..{hi}, got {arg!r}")
    return int(m.group(1))


def float_arg(spec: str, arg: str, lo: float, hi: float) -> float:
    try:
        v = float(arg)
    except ValueError:
        v = float("nan")
    if not lo <= v <= hi:
        raise SalomiError(f"bad method spec {spec!r}: {arg!r} must be a number in {lo}..{hi}")
    return v


def _ensure_registered() -> None:
    # Importing the modules runs their @register_method decorators.
    from salomi.quantizers import methods  # noqa: F401


def parse_method(spec: str) -> Quantizer:
    _ensure_registered()
    parts = spec.strip().split("+")
    base_name, *base_args = parts[0].split(":")
    entry = METHODS.get(base_name)
    if entry is None:
        raise SalomiError(f"unknown method {spec!r}; known methods: {', '.join(sorted(METHODS))} (see `salomi quantize --help`)")
    try:
        q = entry.factory(spec, *base_args)
    except TypeError:
        raise SalomiError(f"bad method spec {spec!r}: usage {entry.usage}") from None
    for part in parts[1:]:
        name, *args = part.split(":")
        w = WRAPPERS.get(name)
        if w is None:
            raise SalomiError(f"unknown residual {part!r} in {spec!r}; known: {', '.join(sorted(WRAPPERS)) or 'none'}")
        try:
            q = w.factory(spec, q, *args)
        except TypeError:
            raise SalomiError(f"bad method spec {spec!r}: usage +{w.usage}") from None
    return q


def methods_help() -> str:
    _ensure_registered()
    lines = ["methods (SPEC := BASE[+WRAPPER...]):"]
    for e in METHODS.values():
        lines.append(f"  {e.usage:<24} {e.help}")
    for e in WRAPPERS.values():
        lines.append(f"  +{e.usage:<23} {e.help}")
    return "\n".join(lines)
