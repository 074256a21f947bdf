"""Storage kind "truncate": no sharing; task t keeps the top k_t directions of its own dW.

Coefficients "<module>.B" (out, k_t) and "<module>.A" (in, k_t), k_t = ranks[task]; nothing in the basis;
k_t (out + in) numbers per task. Its error curve is exact and data-free: task t's relative squared dW error
at rank k is the singular energy it drops.
"""

from __future__ import annotations

import math

import torch

from typing import TYPE_CHECKING

from rmm.canonical import singular_values
from rmm.errors import RMMError
from rmm.storage.base import FACTORS, Choice, Curves, StorageKind

if TYPE_CHECKING:
    from rmm.bundle import ModuleEntry


def truncation_errors(S: torch.Tensor) -> torch.Tensor:
    """(T, r + 1): each task's relative squared dW error when it keeps its top k directions, k = 0..r."""
    energy = (S * S).sum(-1).clamp_min(torch.finfo(S.dtype).tiny)  # ||dW_t||^2
    tail = (S * S).flip(-1).cumsum(-1).flip(-1)  # tail[:, k] = energy beyond the top k
    return torch.cat([tail, S.new_zeros(S.shape[0], 1)], dim=1) / energy[:, None]


def plain_rank(rank: int, ratio: float) -> int:
    """Plain truncation's rank for an adapter of `rank` at storage `ratio`: floor(ratio r), 1 to r."""
    return min(rank, max(1, math.floor(ratio * rank + 1e-9)))


class Truncate(StorageKind):
    name = "truncate"
    canonical = True

    def check(self, mod):
        if mod.ranks is None:
            raise ValueError(f"module {mod.name!r} is stored as truncate without its ranks")

    def check_tasks(self, mod, tasks):
        if mod.ranks.keys() != set(tasks):
            raise ValueError(f"module {mod.name!r} gives ranks for other tasks than the manifest's")

    def basis_specs(self, mod, dtype):
        return {}

    def coef_specs(self, mod, dtype, task):
        return {f: (dtype, (n, mod.ranks[task])) for f, n in zip(FACTORS, (mod.out_features, mod.in_features))}

    def stored_numbers(self, mod, tasks):
        return sum(mod.ranks.values()) * (mod.out_features + mod.in_features)

    def describe(self, mod):
        lo, hi = min(mod.ranks.values()), max(mod.ranks.values())
        return f"truncate {lo}" if lo == hi else f"truncate {lo}-{hi}"

    def for_tasks(self, mod: ModuleEntry, tasks: list[str]) -> ModuleEntry:
        missing = [t for t in tasks if t not in mod.ranks]
        if missing:
            raise RMMError(f"the basis' plan has no rank for task(s) {missing}", module=mod.name)
        return mod.model_copy(update={"ranks": {t: mod.ranks[t] for t in tasks}})

    def fit(self, mod, adapters, raw, factors, dtype, given):
        """Cut to k below its rank, a task keeps its top k canonical directions. Kept whole, it keeps its raw
        factors unrotated, unfolded, with its whole scaling s in A: its own lora_B and s lora_A, the original
        numbers in any dtype whenever s is a power of two (alpha = r, 2 r, ...), so revert rebuilds its dW exactly."""
        own = []
        for t, a in enumerate(adapters):
            k, B, A = mod.ranks[a.name], factors[0][t], factors[1][t]
            if k >= a.modules[mod.name].rank:
                root = math.sqrt(a.modules[mod.name].scaling)
                B, A = raw[0][t] / root, raw[1][t] * root
            own.append({"B": B[:, :k].to(dtype), "A": A[:k].mT.to(dtype)})
        return {}, own, None

    def rebuild(self, mod, x):
        return x["B"], x["A"].mT

    def curve(self, raw, canonical, ranks):
        return truncation_errors(singular_values(canonical[0]))

    def choose(self, c: Curves, price: float):
        """Each task its own rank: the price per direction, (out + in) x price, and the module's weight cancel."""
        curve, n = c.kinds[self.name], c.n_out + c.n_in
        ks = (curve + price * torch.arange(curve.shape[1], dtype=curve.dtype)).argmin(dim=1)
        errors = curve.gather(1, ks[:, None]).squeeze(1)
        cost = int(ks.sum()) * n
        return n * errors.sum() + price * cost, Choice(self.name, ks.tolist(), cost, errors.tolist())

    def plain(self, modules, budget):
        """Every task keeps floor(ratio x its rank) directions (at least one)."""
        ratio = budget / sum(c.numbers for c in modules)
        plan = []
        for c in modules:
            ks = [plain_rank(r, ratio) for r in c.ranks]
            errors = [float(c.kinds[self.name][t, k]) for t, k in enumerate(ks)]
            plan.append(Choice(self.name, ks, sum(ks) * (c.n_out + c.n_in), errors))
        return plan

    def planned(self, mod, choice, tasks):
        return mod.model_copy(update={"method": self.name, "ranks": dict(zip(tasks, choice.setting))})

    def federated_curve(self, S, rows, bases):
        return truncation_errors(S)
