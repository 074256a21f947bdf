"""The storage allocator of `rmm merge` (method "auto"): one global budget, spent module by module on
whichever storage kind (`rmm.storage.KINDS`) removes the most dW error, each kind with its own exact,
data-free error curve per module (per-task truncation, joint sharing, the paper's per-position sharing).

The objective is the sum over tasks and modules of (out + in) x relative squared error: a module counts
in proportion to the numbers it holds, so modules with alike spectra keep alike ranks (plain truncation)
and budget moves only where a spectrum says it buys more. (Counting every module alike starved the wide
MLP modules and lost accuracy to plain truncation on every quality suite.) A price per stored number (a
Lagrange multiplier) is bisected until the cheapest plan at that price fits the budget. The price can
miss the best plan where a curve is not convex, so each kind's plain plan at the same storage ratio
(`StorageKind.plain`: every task truncated to that share of its rank; every module jointly shared at that
share of its numbers; the paper's RMM with the largest p that fits) is a candidate too, and the plan with the
smallest objective wins: never worse than any of them on its own.
"""

from __future__ import annotations

import math

import torch

from rmm.canonical import canonicalize
from rmm.device import to_cpu
from rmm.errors import RMMError
from rmm.storage import KINDS, Choice, Curves, StorageKind


def curves(B: torch.Tensor, A: torch.Tensor, ranks: list[int]) -> Curves:
    """One module's error curves, centrally, from all tasks' raw factors (T, out, r), (T, r, in) and
    their own ranks. A federation computes the same from its sites' uploads (`rmm.payload`)."""
    canonical = canonicalize(B, A)
    kinds = {name: to_cpu(k.curve((B, A), canonical, ranks)) for name, k in KINDS.items()}
    return Curves(B.shape[1], A.shape[2], B.shape[2], tuple(ranks), kinds)


def allocate(modules: list[Curves], budget: float) -> list[Choice]:
    """The plan minimising sum (out + in) x relative squared error with at most `budget` numbers stored: the best
    by that objective of the priced plan over every kind and each kind's plain plan.

    A budget whose plan keeps nothing (every error 1) is refused, naming `minimum_ratio`, which keeps something.
    """
    plans = candidate_plans(modules, budget)
    pool = [plans[name] for name in DATA_FREE if name in plans]
    if not pool:
        raise _keeps_nothing(modules, budget)
    return min(pool, key=lambda p: dw_objective(modules, p))


# The candidates the data-free default picks from by dW error; `candidate_plans` adds each kind's own priced plan,
# which calibration (`rmm.calibrate`) also weighs. Kept apart so the default without data stays what it was.
DATA_FREE = ("priced", *KINDS)


def candidate_plans(modules: list[Curves], budget: float) -> dict[str, list[Choice]]:
    """Every plan the allocator weighs under `budget`, by name, in order: "priced" (a price per stored number
    bisected until the plan fits, every kind open to every module), each kind's plain plan ("<kind>"), and each
    kind alone under a price ("priced-<kind>"). Only plans that fit and keep something; a plan equal to an
    earlier one is left out. Refuses a budget under which no plan keeps anything."""
    plans = {"priced": _priced(modules, budget, tuple(KINDS.values()))}
    plans |= {name: k.plain(modules, budget) for name, k in KINDS.items()}
    plans |= {f"priced-{name}": _priced(modules, budget, (k,)) for name, k in KINDS.items()}
    found: dict[str, list[Choice]] = {}
    for name, plan in plans.items():
        if sum(ch.cost for ch in plan) <= budget and any(ch.cost for ch in plan) and plan not in found.values():
            found[name] = plan
    if not found:
        raise _keeps_nothing(modules, budget)
    return found


def _keeps_nothing(modules: list[Curves], budget: float) -> RMMError:
    ratio = budget / sum(c.numbers for c in modules)
    return RMMError(
        f"storage ratio {ratio:.3g} keeps nothing (every dW error would be 1); the smallest sure to "
        f"keep something is {_round_up(minimum_ratio(modules))} (one direction shared by all tasks, in "
        "the module where that costs least)"
    )


def dw_objective(modules: list[Curves], plan: list[Choice]) -> float:
    """What the data-free default minimises: sum over modules of (out + in) x the tasks' relative squared dW
    errors."""
    return float(sum((c.n_out + c.n_in) * sum(ch.errors) for c, ch in zip(modules, plan)))


def _priced(modules: list[Curves], budget: float, kinds: tuple[StorageKind, ...]) -> list[Choice]:
    """The cheapest options of `kinds` at the lowest price per stored number whose plan fits `budget`."""
    lo, hi = 0.0, 1.0
    while _cost(modules, hi, kinds) > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):  # bisect the price; `hi` always fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _cost(modules, mid, kinds) > budget else (lo, mid)
    return [_choose(c, hi, kinds) for c in modules]


def minimum_ratio(modules: list[Curves]) -> float:
    """The smallest storage ratio that keeps anything for certain: from it on, some kind's plain plan (a candidate
    of `allocate`) keeps something in some module (joint sharing: one direction, U (out x 1), V (in x 1) and one
    number per task)."""
    return min(r for c in modules for k in KINDS.values() if (r := k.keeps_something_from(c)) is not None)


def _round_up(x: float, digits: int = 3) -> float:
    """`x` rounded up to `digits` significant digits, so that the number printed is itself enough."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale * (1 + 1e-12)) / scale


def _cost(modules: list[Curves], price: float, kinds: tuple[StorageKind, ...]) -> int:
    return sum(_choose(c, price, kinds).cost for c in modules)


def _choose(c: Curves, price: float, kinds: tuple[StorageKind, ...]) -> Choice:
    """The cheapest of each kind's best option at `price` per stored number; ties go to the first kind."""
    return min((k.choose(c, price) for k in kinds), key=lambda found: found[0])[1]
