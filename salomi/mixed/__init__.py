"""Mixed precision under a bit budget: per-layer sensitivity, a knapsack allocator, and the planner
that turns `--bpw` / `--model-bpw` into a per-layer recipe for api.quantize."""

from salomi.mixed.allocate import Allocation, allocate, byte_range
from salomi.mixed.plan import Plan, make_plan, plan_recipe
from salomi.mixed.sensitivity import DEFAULT_CANDIDATES, sensitivity_table, validate_proxy

__all__ = [
    "DEFAULT_CANDIDATES",
    "Allocation",
    "Plan",
    "allocate",
    "byte_range",
    "make_plan",
    "plan_recipe",
    "sensitivity_table",
    "validate_proxy",
]
