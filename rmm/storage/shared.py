"""Storage kind "shared": the paper's RMM, a per-position basis shared by all tasks.

Every row of B and column of A (a *position*) keeps the tasks' mean and top-p basis, each task p
coefficients per position (`rmm.solver`): basis "<module>.B.mean" (out, r), "<module>.B.basis" (out, r, p),
same for A (in, ...); coefficients "<module>.B" (out, p), "<module>.A" (in, p); (out + in)(r + p (r + T))
numbers. Fitted to the raw factors (unless the merge canonicalises): they line up across tasks when the
adapters share an ancestry (one released adapter, one seed), and then this is the cheapest sharing.
"""

from __future__ import annotations

import operator
from functools import partial, reduce

import torch

from rmm.metrics import frobenius_inner, squared_relative
from rmm.solver import (
    Basis,
    basis_of,
    coefficients,
    decode,
    encode,
    energy_kept,
    reconstruct,
    smallest_exact,
    solve,
    storage_numbers,
    summary_specs,
)
from rmm.storage.base import FACTORS, Choice, Curves, StorageKind

CHUNK = 1 << 22  # numbers of the tasks' rebuilt factors formed at once when measuring curves


def shared_errors(B: torch.Tensor, A: torch.Tensor, bases: tuple[Basis, Basis]) -> torch.Tensor:
    """(T, p + 1): each task's relative squared dW error when every position of its raw factors
    (T, out, r), (T, r, in) keeps the mean and the top p of the per-position bases (of B's rows,
    A's columns), p = 0..the bases' size.

    Each fit grows by one basis vector per p, and ||dW - fit||^2 is taken from r x r Gram matrices
    (`rmm.metrics.squared_relative`), dW's own computed once."""
    step = max(1, CHUNK // ((B.shape[1] + A.shape[2]) * B.shape[2]))  # tasks at a time: a fit of each at once
    found = []
    for lo in range(0, B.shape[0], step):
        X = (B[lo : lo + step], A[lo : lo + step].mT)  # positions of each factor: (tasks, P, r)
        C = [coefficients(b.mean, b.vectors, x) for b, x in zip(bases, X)]
        fits = [b.mean.expand_as(x).clone() for b, x in zip(bases, X)]
        own = _gram_inner(X, X)
        errors = []
        for p in range(bases[0].p + 1):
            if p:
                for fit, b, c in zip(fits, bases, C):
                    fit.add_(c[..., p - 1, None] * b.vectors[..., p - 1])
            errors.append(squared_relative(own, _gram_inner(X, fits), _gram_inner(fits, fits)))
        found.append(torch.stack(errors, dim=1))
    return torch.cat(found)


def _gram_inner(X: tuple[torch.Tensor, torch.Tensor], Y: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """<B_X A_X, B_Y A_Y>_F per task, from factors given as positions (B's rows, A's columns)."""
    return frobenius_inner(X[0], X[1].mT, Y[0], Y[1].mT)


def shared_cap(rank: int, ranks: list[int]) -> int:
    """The largest per-position basis size worth curving: p <= min(r, T - 1) carries information, and
    beyond (sum of ranks - r) / (r + T) a shared module stores more than every task kept whole."""
    return max(0, min(rank, len(ranks) - 1, (sum(ranks) - rank) // (rank + len(ranks))))


def position_bases(B: torch.Tensor, A: torch.Tensor, ranks: list[int]) -> tuple[Basis, Basis]:
    """The per-position bases of raw factors (T, out, r), (T, r, in) of tasks of `ranks`, up to `shared_cap`."""
    p = shared_cap(B.shape[2], ranks)
    return basis_of(B, p), basis_of(A.mT, p)


def _read_factor(read, factor: str, suffix: str) -> torch.Tensor:
    return read(f"{factor}.{suffix}").double()


def _positions(factors) -> tuple[torch.Tensor, torch.Tensor]:
    """Each factor's tasks' vectors per position: B's rows (T, out, r) and A's columns (T, in, r)."""
    return factors[0], factors[1].mT


class Shared(StorageKind):
    name = "shared"
    canonical = False

    def basis_specs(self, mod, dtype):
        specs = {}
        for f, n in zip(FACTORS, (mod.out_features, mod.in_features)):
            specs |= {f"{f}.mean": (dtype, (n, mod.rank)), f"{f}.basis": (dtype, (n, mod.rank, mod.p))}
        return specs

    def coef_specs(self, mod, dtype, task):
        return {f: (dtype, (n, mod.p)) for f, n in zip(FACTORS, (mod.out_features, mod.in_features))}

    def stored_numbers(self, mod, tasks):
        return sum(storage_numbers(n, mod.rank, tasks, mod.p) for n in (mod.out_features, mod.in_features))

    def describe(self, mod):
        return f"p={mod.p}"

    def basis_size(self, mod):
        return mod.p

    def fit(self, mod, adapters, raw, factors, dtype, given):
        """Energy: per factor, the share of the tasks' spread around the mean the basis keeps."""
        shared, Cs, energy = {}, {}, {}
        for factor, X in zip(FACTORS, _positions(factors)):
            if given is None:
                solution = basis_of(X, mod.p)
                mean, vectors = solution.mean.to(dtype), solution.vectors.to(dtype)
            else:
                mean, vectors = (given[f"{factor}.{k}"].to(X.device, dtype) for k in ("mean", "basis"))
            C = coefficients(mean.double(), vectors.double(), X)
            energy[factor] = energy_kept(X, mean.double(), reconstruct(mean.double(), vectors.double(), C))
            shared |= {f"{factor}.mean": mean, f"{factor}.basis": vectors}
            Cs[factor] = C.to(dtype)
        return shared, [{f: Cs[f][t] for f in FACTORS} for t in range(len(adapters))], energy

    def rebuild(self, mod, x):
        B, A = (reconstruct(x[f"{f}.mean"], x[f"{f}.basis"], x[f]) for f in FACTORS)
        return B, A.mT

    def curve(self, raw, canonical, ranks):
        return shared_errors(*raw, position_bases(*raw, ranks))

    def _choice(self, c: Curves, p: int) -> Choice:
        return Choice(self.name, p, int(self._cost(c, torch.tensor(p))), c.kinds[self.name][:, p].tolist())

    def _cost(self, c: Curves, p: torch.Tensor) -> torch.Tensor:
        return sum(storage_numbers(n, c.rank, len(c.ranks), p) for n in (c.n_out, c.n_in))

    def choose(self, c, price):
        errors = c.kinds[self.name]
        objective = (c.n_out + c.n_in) * errors.sum(0) + price * self._cost(c, torch.arange(errors.shape[1]))
        p = int(objective.argmin())
        return objective[p], self._choice(c, p)

    def plain(self, modules, budget):
        """The paper's RMM: one p for every module (capped by what each can use), the largest that fits;
        else the means alone (refused by the allocator if over the budget)."""
        widths = [c.kinds[self.name].shape[1] for c in modules]
        for p in range(max(widths) - 1, -1, -1):
            plan = [self._choice(c, min(p, w - 1)) for c, w in zip(modules, widths)]
            if sum(ch.cost for ch in plan) <= budget:
                return plan
        return plan

    def planned(self, mod, choice, tasks):
        return mod.model_copy(update={"method": self.name, "p": choice.setting})

    def spectra_specs(self, mod, n):
        """An exact summary of the tasks' raw factors per position: the moments or a full-rank sketch, the smaller."""
        specs, how = {}, smallest_exact(n, mod.rank)
        for f, P in zip(FACTORS, (mod.out_features, mod.in_features)):
            specs |= {f"{f}.{suffix}": spec for suffix, spec in summary_specs(P, mod.rank, n, *how).items()}
        return specs

    def spectra(self, mod, raw, canonical):
        how = smallest_exact(raw[0].shape[0], mod.rank)
        parts = {}
        for f, X in zip(FACTORS, _positions(raw)):
            parts |= {f"{f}.{suffix}": x.contiguous() for suffix, x in encode(X, *how)}
        return parts

    def bases_specs(self, mod, ranks):
        return self.basis_specs(mod.model_copy(update={"p": shared_cap(mod.rank, ranks)}), torch.float64)

    def bases(self, mod, ranks, sites, specs):
        out = {}
        for f in FACTORS:
            total = reduce(
                operator.add,
                (
                    decode(smallest_exact(n, mod.rank)[0], n, mod.rank, partial(_read_factor, read, f))
                    for n, read in sites
                ),
            )
            basis = solve(total, specs[f"{f}.basis"][1][2])
            out |= {f"{f}.mean": basis.mean.contiguous(), f"{f}.basis": basis.vectors.contiguous()}
        return out

    def curve_width(self, mod, bases):
        return bases("B.basis")[2] + 1

    def site_curve(self, mod, raw, canonical, bases):
        per_position = tuple(
            Basis(bases(f"{f}.mean").double(), bases(f"{f}.basis").double(), torch.empty(0)) for f in FACTORS
        )
        return shared_errors(*raw, per_position)

    def federated_curve(self, S, rows, bases):
        return rows
