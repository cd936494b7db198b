"""Choose one method per layer: minimise the summed predicted damage subject to the summed
bytes <= budget (a multiple-choice knapsack).

Solved by dynamic programming over bytes. Each layer's cheapest choice is taken as the
base, so the DP only spends the budget above the sum of the minima. Byte costs are
counted in units of U: U is the gcd of all extra costs when the capacity in such units
is at most `max_states` (then the DP is exact: the true optimum), otherwise the
smallest U that gives `max_states` states, with every cost rounded *up* to a whole
number of units (so the DP's answer is always feasible in exact bytes; it may leave
at most ~U bytes per layer unspent). A greedy fix-up then spends the leftover exact
slack on the best single-layer upgrades that still fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from salomi.errors import SalomiError

Costs = Mapping[str, Mapping[str, tuple[int, float]]]  # layer -> choice -> (bytes, damage)


@dataclass
class Allocation:
    choice: dict[str, str]
    bytes: int
    damage: float
    budget: int
    exact: bool  # True when the DP ran in exact byte units (the result is the true optimum)


def byte_range(costs: Costs) -> tuple[int, int]:
    """(bytes of the cheapest choice everywhere, bytes of the most expensive everywhere)."""
    _check(costs)
    return (sum(min(b for b, _ in c.values()) for c in costs.values()),
            sum(max(b for b, _ in c.values()) for c in costs.values()))


def _check(costs: Costs) -> None:
    if not costs:
        raise SalomiError("nothing to allocate: no layers")
    for n, c in costs.items():
        if not c:
            raise SalomiError(f"layer {n} has no candidate method")
        for k, (b, d) in c.items():
            if b < 0 or not math.isfinite(d):
                raise SalomiError(f"layer {n}, choice {k}: bad cost (bytes={b}, damage={d})")


def _pareto(c: Mapping[str, tuple[int, float]]) -> list[tuple[str, int, float]]:
    """Choices not dominated by a cheaper-or-equal one with lower-or-equal damage, by bytes."""
    items = sorted(((b, d, k) for k, (b, d) in c.items()), key=lambda t: (t[0], t[1], t[2]))
    out: list[tuple[str, int, float]] = []
    for b, d, k in items:
        if out and d >= out[-1][2]:
            continue
        out.append((k, b, d))
    return out


def allocate(costs: Costs, budget_bytes: int, max_states: int = 200_000) -> Allocation:
    """Minimise sum(damage) s.t. sum(bytes) <= budget_bytes; one choice per layer."""
    _check(costs)
    lo, hi = byte_range(costs)
    if budget_bytes < lo:
        raise SalomiError(f"budget of {budget_bytes} bytes is below the cheapest choice ({lo} bytes); "
                          f"feasible: {lo}..{hi} bytes")
    names = list(costs)
    opts = [_pareto(costs[n]) for n in names]
    base = [o[0][1] for o in opts]
    cap = budget_bytes - sum(base)
    extra = [[b - b0 for _, b, _ in o] for o, b0 in zip(opts, base)]
    g = 0
    for e in extra:
        for x in e:
            g = math.gcd(g, x)
    if g == 0:  # every layer has a single Pareto choice
        pick = [0] * len(names)
        exact = True
    else:
        exact = cap // g <= max_states
        unit = g if exact else -(-cap // max_states)
        cap_u = min(cap // unit, sum(max(-(-x // unit) for x in e) for e in extra))
        pick = _dp([[-(-x // unit) for x in e] for e in extra], [[d for _, _, d in o] for o in opts], cap_u)
    choice = {n: opts[i][pick[i]][0] for i, n in enumerate(names)}
    choice = _fixup(costs, choice, budget_bytes)
    total_b = sum(costs[n][k][0] for n, k in choice.items())
    total_d = sum(costs[n][k][1] for n, k in choice.items())
    assert total_b <= budget_bytes
    return Allocation(choice, total_b, total_d, budget_bytes, exact)


def _dp(weights: list[list[int]], damages: list[list[float]], cap: int) -> list[int]:
    """Multiple-choice knapsack: best[c] = min damage with <= c units; returns the choice index per layer."""
    n = len(weights)
    best = np.zeros(cap + 1, dtype=np.float64)  # no layers yet: zero damage at any capacity
    arg = np.zeros((n, cap + 1), dtype=np.uint8 if max(len(w) for w in weights) < 256 else np.int32)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        a = arg[i]
        for j, (w, d) in enumerate(zip(weights[i], damages[i])):
            if w > cap:
                continue
            cand = best[: cap + 1 - w] + d
            tgt = new[w:]
            better = cand < tgt
            tgt[better] = cand[better]
            a[w:][better] = j
        best = new
    pick = [0] * n
    c = cap
    for i in range(n - 1, -1, -1):
        j = int(arg[i, c])
        pick[i] = j
        c -= weights[i][j]
    return pick


def _fixup(costs: Costs, choice: dict[str, str], budget: int) -> dict[str, str]:
    """Spend leftover bytes: repeatedly apply the single-layer change with the largest damage
    reduction that still fits in the exact byte budget."""
    choice = dict(choice)
    used = sum(costs[n][k][0] for n, k in choice.items())
    while True:
        slack = budget - used
        best = (0.0, None, None)
        for n, k in choice.items():
            b0, d0 = costs[n][k]
            for k2, (b, d) in costs[n].items():
                if b - b0 <= slack and d0 - d > best[0]:
                    best = (d0 - d, n, k2)
        if best[1] is None:
            break
        n, k2 = best[1], best[2]
        used += costs[n][k2][0] - costs[n][choice[n]][0]
        choice[n] = k2
    return choice
