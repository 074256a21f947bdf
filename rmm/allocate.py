"""The storage allocator of `rmm merge` (method "auto"): one global budget, spent module by module on
per-task rank truncation or on joint sharing, wherever it removes the most dW error.

For every module two families of options, each with an exact, data-free error curve:

* truncation: task t keeps the top k_t directions of its canonical factors (B = U sqrt(S),
  A = sqrt(S) V^T); its relative squared dW error is the singular energy it drops; k_t (out + in) numbers;
* joint sharing of size K: U (out x K) and V (in x K) shared by all tasks plus a K x K core per task,
  dW_t ~= U (U^T dW_t V) V^T; relative squared error 1 - ||U^T dW_t V||^2 / ||dW_t||^2 (an orthogonal
  projection); K out + K in + T K^2 numbers (each side capped at what it can hold).

The objective is the sum over tasks and modules of (out + in) x relative squared error: a module counts
in proportion to the numbers it holds, so modules with alike spectra keep alike ranks (plain truncation)
and budget moves only where a spectrum says it buys more. (Counting every module alike starved the wide
MLP modules and lost accuracy to plain truncation on every quality suite.) A price per stored number (a
Lagrange multiplier) is bisected until the cheapest plan at that price fits the budget. The price can
miss the best plan where a curve is not convex, so the two plain plans at the same storage ratio (every
task truncated to that share of its rank; every module jointly shared at that share of its numbers) are
candidates too, and the plan with the smallest objective wins: never worse than either on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Curves:
    """One module's options: relative squared dW error per task of every truncation rank and joint size."""

    n_out: int
    n_in: int
    ranks: tuple[int, ...]  # each task's own rank at this module (the factors are zero-padded beyond)
    trunc: torch.Tensor  # (T, r + 1): error of keeping the top k directions, k = 0..r
    joint: torch.Tensor  # (T, K + 1): error of sharing K directions, K = 0..max(Ku, Kv)
    sides: tuple[int, int]  # how many directions each side can hold: (Ku, Kv)

    def joint_cost(self, K: torch.Tensor) -> torch.Tensor:
        ku, kv = K.clamp(max=self.sides[0]), K.clamp(max=self.sides[1])
        return ku * self.n_out + kv * self.n_in + self.trunc.shape[0] * ku * kv


@dataclass(frozen=True)
class Choice:
    """What one module keeps: per-task ranks ("truncate") or a joint size (Ku, Kv) ("joint")."""

    kind: Literal["truncate", "joint"]
    ranks: list[int]  # truncate: one rank per task
    size: tuple[int, int]  # joint: (Ku, Kv)
    cost: int  # numbers stored
    errors: list[float]  # relative squared dW error per task, as planned


def joint_bases(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared bases of canonical factors (T, out, r), (T, r, in): U (out, Ku), V (in, Kv), best first.

    The columns of [U_1 S_1, .., U_T S_T] span the tasks' column spaces weighted by their singular
    values (their Gram is sum_t dW_t dW_t^T); its top left singular vectors are the best shared U.
    Nothing out x in is formed.
    """
    root = (B * B).sum(-2).sqrt().unsqueeze(-2)  # sqrt(S) per canonical direction
    U = torch.linalg.svd(torch.cat(list(B * root), dim=1), full_matrices=False)[0]
    V = torch.linalg.svd(torch.cat(list(A * root.mT), dim=0), full_matrices=False)[2].mT
    return U, V


def curves(B: torch.Tensor, A: torch.Tensor, ranks: list[int]) -> Curves:
    """The error curves of one module from all tasks' canonical factors (T, out, r), (T, r, in) and
    their own ranks."""
    T = B.shape[0]
    S = (B * B).sum(-2)  # (T, r): singular values of dW_t, descending
    energy = (S * S).sum(-1).clamp_min(torch.finfo(S.dtype).tiny)  # ||dW_t||^2
    tail = (S * S).flip(-1).cumsum(-1).flip(-1)  # tail[:, k] = energy beyond the top k
    trunc = torch.cat([tail, torch.zeros(T, 1, dtype=S.dtype)], dim=1) / energy[:, None]
    U, V = joint_bases(B, A)
    M = (U.mT @ B) @ (A @ V)  # (T, Ku, Kv); a smaller K keeps its top-left block
    k_max = max(U.shape[1], V.shape[1])
    kept = [(M[:, : min(k, U.shape[1]), : min(k, V.shape[1])] ** 2).sum((-2, -1)) for k in range(k_max + 1)]
    joint = (1 - torch.stack(kept, dim=1) / energy[:, None]).clamp_min(0)
    return Curves(B.shape[1], A.shape[2], tuple(ranks), trunc, joint, (U.shape[1], V.shape[1]))


def allocate(modules: list[Curves], budget: float) -> list[Choice]:
    """The plan minimising sum (out + in) x relative squared error with at most `budget` numbers stored."""
    lo, hi = 0.0, 1.0
    while _cost(modules, hi) > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):  # bisect the price; `hi` always fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _cost(modules, mid) > budget else (lo, mid)
    ratio = budget / sum(sum(c.ranks) * (c.n_out + c.n_in) for c in modules)
    plans = [[_choose(c, hi) for c in modules], [_truncate(c, ratio) for c in modules], [_joint(c, ratio) for c in modules]]
    fitting = [p for p in plans if sum(ch.cost for ch in p) <= budget]
    return min(fitting, key=lambda p: sum((c.n_out + c.n_in) * sum(ch.errors) for c, ch in zip(modules, p)))


def _cost(modules: list[Curves], price: float) -> int:
    return sum(_choose(c, price).cost for c in modules)


def _truncate(c: Curves, ratio: float) -> Choice:
    """Plain truncation: every task keeps floor(ratio x its rank) directions (at least one)."""
    ks = [min(r, max(1, math.floor(ratio * r + 1e-9))) for r in c.ranks]
    errors = [float(c.trunc[t, k]) for t, k in enumerate(ks)]
    return Choice("truncate", ks, (0, 0), sum(ks) * (c.n_out + c.n_in), errors)


def _joint(c: Curves, ratio: float) -> Choice:
    """Plain joint sharing: the largest K whose numbers fit `ratio` of the module's."""
    sizes = torch.arange(c.joint.shape[1])
    fits = c.joint_cost(sizes) <= ratio * sum(c.ranks) * (c.n_out + c.n_in)
    K = int(sizes[fits].max()) if fits.any() else 0
    return Choice("joint", [], (min(K, c.sides[0]), min(K, c.sides[1])), int(c.joint_cost(sizes[K])), c.joint[:, K].tolist())


def _choose(c: Curves, price: float) -> Choice:
    """The cheaper of per-task truncation and the best joint size at `price` per stored number.

    The error curves are relative, so in numbers each error weighs (out + in): the price per
    direction of truncation, (out + in) x price, and the module's weight cancel to `price`.
    """
    n = c.n_out + c.n_in
    T, ranks = c.trunc.shape[0], torch.arange(c.trunc.shape[1], dtype=c.trunc.dtype)
    ks = (c.trunc + price * ranks).argmin(dim=1)  # each task its own rank
    trunc_err = c.trunc.gather(1, ks[:, None]).squeeze(1)
    trunc_cost = int(ks.sum()) * n
    sizes = torch.arange(c.joint.shape[1])
    joint_cost = c.joint_cost(sizes)
    objective = n * c.joint.sum(0) + price * joint_cost
    K = int(objective.argmin())
    if n * trunc_err.sum() + price * trunc_cost <= objective[K]:
        return Choice("truncate", ks.tolist(), (0, 0), trunc_cost, trunc_err.tolist())
    size = (min(K, c.sides[0]), min(K, c.sides[1]))
    return Choice("joint", [], size, int(joint_cost[K]), c.joint[:, K].tolist())
