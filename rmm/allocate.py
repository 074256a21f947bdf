"""The storage allocator of `rmm merge` (method "auto"): one global budget, spent module by module on
per-task rank truncation or on joint sharing, wherever it removes the most dW error.

For every module three families of options, each with an exact, data-free error curve:

* truncation: task t keeps the top k_t directions of its canonical factors (B = U sqrt(S),
  A = sqrt(S) V^T); its relative squared dW error is the singular energy it drops; k_t (out + in) numbers;
* joint sharing of size K: U (out x K) and V (in x K) shared by all tasks plus a K x K core per task,
  dW_t ~= U (U^T dW_t V) V^T; relative squared error 1 - ||U^T dW_t V||^2 / ||dW_t||^2 (an orthogonal
  projection); K out + K in + T K^2 numbers (each side capped at what it can hold);
* per-position sharing of size p (the paper's RMM, on the raw factors): every row of B and column of
  A keeps the tasks' mean and top-p basis, each task p coefficients per position; the dW error of
  the rebuilt factors; (out + in)(r + p (r + T)) numbers. Raw factors line up across tasks when the
  adapters share an ancestry (one released adapter, one seed); then this is the cheapest sharing.

The objective is the sum over tasks and modules of (out + in) x relative squared error: a module counts
in proportion to the numbers it holds, so modules with alike spectra keep alike ranks (plain truncation)
and budget moves only where a spectrum says it buys more. (Counting every module alike starved the wide
MLP modules and lost accuracy to plain truncation on every quality suite.) A price per stored number (a
Lagrange multiplier) is bisected until the cheapest plan at that price fits the budget. The price can
miss the best plan where a curve is not convex, so the three plain plans at the same storage ratio
(every task truncated to that share of its rank; every module jointly shared at that share of its
numbers; the paper's RMM with the largest p that fits) are candidates too, and the plan with the
smallest objective wins: never worse than any of them on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from rmm.canonical import canonicalize
from rmm.errors import RMMError
from rmm.metrics import relative_error
from rmm.solver import Basis, Moments, coefficients, reconstruct, solve, storage_numbers


@dataclass(frozen=True)
class Curves:
    """One module's options: relative squared dW error per task of every truncation rank, joint size
    and per-position basis size."""

    n_out: int
    n_in: int
    ranks: tuple[int, ...]  # each task's own rank at this module (the factors are zero-padded beyond)
    trunc: torch.Tensor  # (T, r + 1): error of keeping the top k directions, k = 0..r
    joint: torch.Tensor  # (T, K + 1): error of sharing K directions, K = 0..max(Ku, Kv)
    sides: tuple[int, int]  # how many directions each side can hold: (Ku, Kv)
    shared: torch.Tensor  # (T, p + 1): error of per-position bases of size p = 0..min(r, T - 1)

    @property
    def rank(self) -> int:  # the module's padded rank r
        return self.trunc.shape[1] - 1

    def joint_cost(self, K: torch.Tensor) -> torch.Tensor:
        return joint_numbers(K.clamp(max=self.sides[0]), K.clamp(max=self.sides[1]), self.n_out, self.n_in, self.trunc.shape[0])

    def shared_cost(self, p: torch.Tensor) -> torch.Tensor:
        return sum(storage_numbers(n, self.rank, self.trunc.shape[0], p) for n in (self.n_out, self.n_in))


def joint_numbers(ku, kv, n_out: int, n_in: int, tasks: int):
    """Numbers a jointly shared module stores: U (out x Ku), V (in x Kv) and a Ku x Kv core per task."""
    return ku * n_out + kv * n_in + tasks * ku * kv


def plain_rank(rank: int, ratio: float) -> int:
    """Plain truncation's rank for an adapter of `rank` at storage `ratio`: floor(ratio r), 1 to r."""
    return min(rank, max(1, math.floor(ratio * rank + 1e-9)))


@dataclass(frozen=True)
class Choice:
    """What one module keeps: per-task ranks ("truncate"), a joint size (Ku, Kv) ("joint") or a
    per-position basis size p ("shared")."""

    kind: Literal["truncate", "joint", "shared"]
    ranks: list[int]  # truncate: one rank per task
    size: tuple[int, int]  # joint: (Ku, Kv)
    cost: int  # numbers stored
    errors: list[float]  # relative squared dW error per task, as planned
    p: int = 0  # shared: the basis size


def stacked_roots(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Square roots of sum_t dW_t dW_t^T and sum_t dW_t^T dW_t from canonical factors (T, out, r),
    (T, r, in): [U_1 S_1, .., U_T S_T] (out, T r) and [V_1 S_1, .., V_T S_T] (in, T r).

    Roots of groups of tasks set side by side are a root of the whole set's sums. Nothing out x in
    is formed.
    """
    root = singular_values(B).sqrt().unsqueeze(-2)  # B root = U_t S_t
    return torch.cat(list(B * root), dim=1), torch.cat(list(A * root.mT), dim=0).mT


def grams(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same roots, pooled: W (side, q) with W W^T unchanged, q = min(side, T r), no column
    belonging to one task. What a federation's site sends."""
    return tuple(_thin(X) for X in stacked_roots(B, A))


def _thin(X: torch.Tensor) -> torch.Tensor:
    """U S of X's thin SVD: the same X X^T in at most min(X.shape) columns."""
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    return U * S


def joint_bases(out_roots: list[torch.Tensor], in_roots: list[torch.Tensor], cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases U (out, Ku) and V (in, Kv), best first, at most `cap` columns, from Gram roots of
    groups of tasks (`grams`): the top left singular vectors of the roots side by side, each column
    signed so that its largest entry is positive. Ku = min(cap, out, T r) however the tasks are grouped."""
    bases = []
    for roots in (out_roots, in_roots):
        U = torch.linalg.svd(torch.cat(roots, dim=1), full_matrices=False)[0][:, :cap]
        sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
        bases.append(U * torch.where(sign == 0, torch.ones_like(sign), sign))
    return bases[0], bases[1]


def joint_cap(n_out: int, n_in: int, ranks: list[int]) -> int:
    """The largest K worth sharing: beyond it a joint module stores more than every task kept whole."""
    whole = sum(ranks) * (n_out + n_in)
    K = 0
    while K < max(n_out, n_in) and joint_numbers(min(K + 1, n_out), min(K + 1, n_in), n_out, n_in, len(ranks)) <= whole:
        K += 1
    return K


def singular_values(B: torch.Tensor) -> torch.Tensor:
    """(T, r): the singular values of each dW_t, from its canonical B = U sqrt(S)."""
    return (B * B).sum(-2)


def truncation_errors(S: torch.Tensor) -> torch.Tensor:
    """(T, r + 1): each task's relative squared dW error when it keeps its top k directions, k = 0..r."""
    energy = (S * S).sum(-1).clamp_min(torch.finfo(S.dtype).tiny)  # ||dW_t||^2
    tail = (S * S).flip(-1).cumsum(-1).flip(-1)  # tail[:, k] = energy beyond the top k
    return torch.cat([tail, torch.zeros(S.shape[0], 1, dtype=S.dtype)], dim=1) / energy[:, None]


def joint_errors(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(T, K + 1): each task's relative squared dW error when sharing the top K of U and V, K = 0..max."""
    S = singular_values(B)
    energy = (S * S).sum(-1).clamp_min(torch.finfo(S.dtype).tiny)
    M = (U.mT @ B) @ (A @ V)  # (T, Ku, Kv); a smaller K keeps its top-left block
    ku, kv = U.shape[1], V.shape[1]
    block = torch.zeros(B.shape[0], ku + 1, kv + 1, dtype=M.dtype)
    block[:, 1:, 1:] = (M * M).cumsum(-1).cumsum(-2)  # block[:, i, j]: energy of the top-left i x j block
    ks = torch.arange(max(ku, kv) + 1)
    kept = block[:, ks.clamp(max=ku), ks.clamp(max=kv)]  # (T, K + 1)
    return (1 - kept / energy[:, None]).clamp_min(0)


def shared_errors(B: torch.Tensor, A: torch.Tensor, bases: tuple[Basis, Basis]) -> torch.Tensor:
    """(T, p + 1): each task's relative squared dW error when every position of its raw factors
    (T, out, r), (T, r, in) keeps the mean and the top p of the per-position bases (of B's rows,
    A's columns), p = 0..the bases' size."""
    X = (B, A.mT)
    C = [coefficients(b.mean, b.vectors, x) for b, x in zip(bases, X)]
    errors = []
    for p in range(bases[0].p + 1):
        B_hat, A_hat = (reconstruct(b.mean, b.vectors[..., :p], c[..., :p]) for b, c in zip(bases, C))
        errors.append(relative_error(B, A, B_hat, A_hat.mT) ** 2)
    return torch.stack(errors, dim=1)


def shared_cap(rank: int, ranks: list[int]) -> int:
    """The largest per-position basis size worth curving: p <= min(r, T - 1) carries information, and
    beyond (sum of ranks - r) / (r + T) a shared module stores more than every task kept whole."""
    return max(0, min(rank, len(ranks) - 1, (sum(ranks) - rank) // (rank + len(ranks))))


def position_bases(B: torch.Tensor, A: torch.Tensor, ranks: list[int]) -> tuple[Basis, Basis]:
    """The per-position bases of raw factors (T, out, r), (T, r, in) of tasks of `ranks`, up to `shared_cap`."""
    p = shared_cap(B.shape[2], ranks)
    return solve(Moments.of(B), p), solve(Moments.of(A.mT), p)


def curves(B: torch.Tensor, A: torch.Tensor, ranks: list[int]) -> Curves:
    """One module's error curves, centrally, from all tasks' raw factors (T, out, r), (T, r, in) and
    their own ranks. A federation computes the same from its sites' uploads (`rmm.payload`)."""
    shared = shared_errors(B, A, position_bases(B, A, ranks))
    B, A = canonicalize(B, A)
    cols, rows = stacked_roots(B, A)
    U, V = joint_bases([cols], [rows], joint_cap(B.shape[1], A.shape[2], ranks))
    return Curves(B.shape[1], A.shape[2], tuple(ranks), truncation_errors(singular_values(B)), joint_errors(B, A, U, V), (U.shape[1], V.shape[1]), shared)


def allocate(modules: list[Curves], budget: float) -> list[Choice]:
    """The plan minimising sum (out + in) x relative squared error with at most `budget` numbers stored.

    A budget whose plan keeps nothing (every error 1) is refused, naming `minimum_ratio`, which keeps something.
    """
    lo, hi = 0.0, 1.0
    while _cost(modules, hi) > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):  # bisect the price; `hi` always fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _cost(modules, mid) > budget else (lo, mid)
    ratio = budget / sum(sum(c.ranks) * (c.n_out + c.n_in) for c in modules)
    plans = [[_choose(c, hi) for c in modules], [_truncate(c, ratio) for c in modules], [_joint(c, ratio) for c in modules], _paper(modules, budget)]
    fitting = [p for p in plans if sum(ch.cost for ch in p) <= budget]
    best = min(fitting, key=lambda p: sum((c.n_out + c.n_in) * sum(ch.errors) for c, ch in zip(modules, p)))
    if sum(ch.cost for ch in best) == 0:
        raise RMMError(f"storage ratio {ratio:.3g} keeps nothing (every dW error would be 1); the smallest sure to keep something is "
                       f"{_round_up(minimum_ratio(modules))} (one direction shared by all tasks, in the module where that costs least)")
    return best


def minimum_ratio(modules: list[Curves]) -> float:
    """The smallest storage ratio that keeps anything for certain: from it on, plain joint sharing (a candidate
    of `allocate`) keeps one direction, U (out x 1), V (in x 1) and one number per task, in some module."""
    return min(float(c.joint_cost(torch.tensor(1))) / (sum(c.ranks) * (c.n_out + c.n_in)) for c in modules)


def _round_up(x: float, digits: int = 3) -> float:
    """`x` rounded up to `digits` significant digits, so that the number printed is itself enough."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale * (1 + 1e-12)) / scale


def _cost(modules: list[Curves], price: float) -> int:
    return sum(_choose(c, price).cost for c in modules)


def _truncate(c: Curves, ratio: float) -> Choice:
    """Plain truncation: every task keeps floor(ratio x its rank) directions (at least one)."""
    ks = [plain_rank(r, ratio) for r in c.ranks]
    errors = [float(c.trunc[t, k]) for t, k in enumerate(ks)]
    return Choice("truncate", ks, (0, 0), sum(ks) * (c.n_out + c.n_in), errors)


def _joint(c: Curves, ratio: float) -> Choice:
    """Plain joint sharing: the largest K whose numbers fit `ratio` of the module's."""
    sizes = torch.arange(c.joint.shape[1])
    fits = c.joint_cost(sizes) <= ratio * sum(c.ranks) * (c.n_out + c.n_in)
    K = int(sizes[fits].max()) if fits.any() else 0
    return Choice("joint", [], (min(K, c.sides[0]), min(K, c.sides[1])), int(c.joint_cost(sizes[K])), c.joint[:, K].tolist())


def _paper(modules: list[Curves], budget: float) -> list[Choice]:
    """The paper's RMM: one p for every module (capped by what each can use), the largest that fits."""
    for p in range(max(c.shared.shape[1] for c in modules) - 1, -1, -1):
        plan = [_shared(c, min(p, c.shared.shape[1] - 1)) for c in modules]
        if sum(ch.cost for ch in plan) <= budget:
            return plan
    return plan  # the means alone; refused by `allocate` if over the budget


def _shared(c: Curves, p: int) -> Choice:
    return Choice("shared", [], (0, 0), int(c.shared_cost(torch.tensor(p))), c.shared[:, p].tolist(), p)


def _choose(c: Curves, price: float) -> Choice:
    """The cheapest of per-task truncation, the best joint size and the best per-position basis size
    at `price` per stored number.

    The error curves are relative, so in numbers each error weighs (out + in): the price per
    direction of truncation, (out + in) x price, and the module's weight cancel to `price`.
    """
    n = c.n_out + c.n_in
    ranks = torch.arange(c.trunc.shape[1], dtype=c.trunc.dtype)
    ks = (c.trunc + price * ranks).argmin(dim=1)  # each task its own rank
    trunc_err = c.trunc.gather(1, ks[:, None]).squeeze(1)
    trunc_cost = int(ks.sum()) * n
    sizes = torch.arange(c.joint.shape[1])
    joint_cost = c.joint_cost(sizes)
    objective = n * c.joint.sum(0) + price * joint_cost
    K = int(objective.argmin())
    ps = torch.arange(c.shared.shape[1])
    shared = n * c.shared.sum(0) + price * c.shared_cost(ps)
    p = int(shared.argmin())
    best = min(n * trunc_err.sum() + price * trunc_cost, objective[K], shared[p])
    if n * trunc_err.sum() + price * trunc_cost == best:
        return Choice("truncate", ks.tolist(), (0, 0), trunc_cost, trunc_err.tolist())
    if objective[K] == best:
        return Choice("joint", [], (min(K, c.sides[0]), min(K, c.sides[1])), int(joint_cost[K]), c.joint[:, K].tolist())
    return _shared(c, p)
