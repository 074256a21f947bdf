"""Storage kind "joint": U (out x Ku) and V (in x Kv) shared by all tasks plus a Ku x Kv core per task.

Basis "<module>.U" (out, Ku), "<module>.V" (in, Kv); coefficients "<module>.M" (Ku, Kv); dW_t ~= U M_t V^T.
U and V are the top singular vectors of the tasks' stacked dW column and row spaces (from the canonical
factors, never out x in); M_t = U^T dW_t V, so task t's relative squared error at size K is the orthogonal
projection's 1 - ||U_K^T dW_t V_K||^2 / ||dW_t||^2. K out + K in + T K^2 numbers (each side capped at what it
can hold). In a federation each site sends Gram roots of its tasks (`grams`), whose side-by-side SVD gives the
same U and V.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rmm.canonical import singular_values
from rmm.storage.base import Choice, Curves, Factors, StorageKind

CHUNK = 1 << 21  # numbers of the tasks' cores formed at once when measuring curves
SIDES = ("U", "V")  # basis on the out side, on the in side
ROOTS = ("W_out", "W_in")  # a site's Gram roots of each side, in its spectra


class JointCurve(NamedTuple):
    errors: torch.Tensor  # (T, K + 1): error of sharing K directions, K = 0..max(Ku, Kv)
    sides: tuple[int, int]  # how many directions each side can hold: (Ku, Kv)


def joint_numbers(ku, kv, n_out: int, n_in: int, tasks: int):
    """Numbers a jointly shared module stores: U (out x Ku), V (in x Kv) and a Ku x Kv core per task."""
    return ku * n_out + kv * n_in + tasks * ku * kv


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
    return tuple(gram_root(X, min(X.shape))[0] for X in stacked_roots(B, A))


def gram_root(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, s): the top k columns of a root of X X^T with orthogonal columns, largest first (U S of X's thin SVD),
    and their norms s (X's singular values), from the eigh of the smaller Gram instead of an SVD: X v for the
    eigenvectors v of X^T X (exact whatever the spectrum: v is orthogonal), or U sqrt(L) for X X^T = U L U^T."""
    wide = X.shape[0] < X.shape[1]
    evals, vectors = torch.linalg.eigh(X @ X.mT if wide else X.mT @ X)  # ascending
    s, vectors = evals.flip(0)[:k].clamp_min(0).sqrt(), vectors.flip(1)[:, :k]
    return (vectors * s if wide else X @ vectors), s


def joint_bases(out_roots: list[torch.Tensor], in_roots: list[torch.Tensor], cap: int) -> Factors:
    """The shared bases U (out, Ku) and V (in, Kv), best first, at most `cap` columns, from Gram roots of
    groups of tasks (`grams`): the top left singular vectors of the roots side by side, each column
    signed so that its largest entry is positive. Ku = min(cap, out, T r) however the tasks are grouped."""
    bases = []
    for roots in (out_roots, in_roots):
        U = top_left_vectors(torch.cat(roots, dim=1), cap)
        sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
        bases.append(U * torch.where(sign == 0, torch.ones_like(sign), sign))
    return bases[0], bases[1]


RESOLVED = 1e-6  # singular values below this share of the largest are not resolved through the Gram matrix


def top_left_vectors(C: torch.Tensor, cap: int) -> torch.Tensor:
    """The top min(cap, *C.shape) left singular vectors of C (side, q), orthonormal columns, best first.

    W / s from `gram_root` instead of an SVD: about 2x faster at a merge's sizes (one 4096 x 256 root: 0.047 ->
    0.023 s; 14336 x 1024: 2.5 -> 1.1 s; `benchmarks/solver_speed.py`). The Gram squares the spread of the singular
    values, so the columns are then made orthonormal again (one Cholesky QR pass, which keeps each leading set of
    columns' span), and directions under `RESOLVED` of the largest, which it cannot resolve (and those past C's
    rank), are filled in by a QR as any orthonormal completion, as an SVD's are."""
    k = min(cap, *C.shape)
    W, s = gram_root(C, k)
    good = int((s > RESOLVED * s[0]).sum()) if k else 0
    U = W[:, :good] / s[:good]
    L = torch.linalg.cholesky(U.mT @ U)
    U = torch.linalg.solve_triangular(L, U.mT, upper=False).mT  # U L^-T: orthonormal, same leading spans
    if good < k:  # Householder QR gives orthonormal columns, orthogonal to U's, whatever the filler holds
        rest = torch.linalg.qr(torch.cat([U, W[:, good:]], dim=1)).Q[:, good:]
        U = torch.cat([U, rest], dim=1)
    return U


def joint_cap(n_out: int, n_in: int, ranks: list[int]) -> int:
    """The largest K worth sharing: beyond it a joint module stores more than every task kept whole."""
    whole = sum(ranks) * (n_out + n_in)
    K = 0
    while K < max(n_out, n_in) and joint_numbers(min(K + 1, n_out), min(K + 1, n_in), n_out, n_in, len(ranks)) <= whole:
        K += 1
    return K


def joint_errors(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(T, K + 1): each task's relative squared dW error when sharing the top K of U and V, K = 0..max."""
    S = singular_values(B)
    energy = (S * S).sum(-1).clamp_min(torch.finfo(S.dtype).tiny)
    ku, kv = U.shape[1], V.shape[1]
    ks = torch.arange(max(ku, kv) + 1, device=B.device)
    kept = []
    step = max(1, CHUNK // max(1, ku * kv))  # tasks at a time: T Ku Kv numbers at once would be 0.5 GiB at T = 1024
    for lo in range(0, B.shape[0], step):
        M = (U.mT @ B[lo : lo + step]) @ (A[lo : lo + step] @ V)  # (tasks, Ku, Kv); a smaller K keeps its top-left
        block = M.new_zeros(M.shape[0], ku + 1, kv + 1)
        block[:, 1:, 1:] = (M * M).cumsum(-1).cumsum(-2)  # block[:, i, j]: energy of the top-left i x j block
        kept.append(block[:, ks.clamp(max=ku), ks.clamp(max=kv)])  # (tasks, K + 1)
    return (1 - torch.cat(kept) / energy[:, None]).clamp_min(0)


def _sides(mod) -> tuple[int, int]:
    return mod.out_features, mod.in_features


class Joint(StorageKind):
    name = "joint"
    canonical = True

    def check(self, mod):
        if mod.size is None:
            raise ValueError(f"module {mod.name!r} is stored as joint without its size")

    def basis_specs(self, mod, dtype):
        return {"U": (dtype, (mod.out_features, mod.size[0])), "V": (dtype, (mod.in_features, mod.size[1]))}

    def coef_specs(self, mod, dtype, task):
        return {"M": (dtype, tuple(mod.size))}

    def stored_numbers(self, mod, tasks):
        return joint_numbers(*mod.size, mod.out_features, mod.in_features, tasks)

    def describe(self, mod):
        return f"joint {mod.size[0]}x{mod.size[1]}"

    def fit(self, mod, adapters, raw, factors, dtype, given):
        B, A = factors
        if given is None:
            cols, rows = stacked_roots(B, A)
            U, V = joint_bases([cols], [rows], max(mod.size))
        else:
            U, V = given["U"].to(B.device), given["V"].to(B.device)
        shared = {"U": U[:, : mod.size[0]].to(dtype), "V": V[:, : mod.size[1]].to(dtype)}
        U, V = shared["U"].double(), shared["V"].double()
        M = (U.mT @ B) @ (A @ V)  # the best cores for the bases as stored
        return shared, [{"M": M[t].to(dtype)} for t in range(len(adapters))], None

    def rebuild(self, mod, x):
        return x["U"] @ x["M"], x["V"].mT

    def curve(self, raw, canonical, ranks):
        B, A = canonical
        cols, rows = stacked_roots(B, A)
        U, V = joint_bases([cols], [rows], joint_cap(B.shape[1], A.shape[2], ranks))
        return JointCurve(joint_errors(B, A, U, V), (U.shape[1], V.shape[1]))

    def _choice(self, c: Curves, K: int) -> Choice:
        curve = c.kinds[self.name]
        cost = int(self._cost(c, torch.tensor(K)))
        return Choice(self.name, (min(K, curve.sides[0]), min(K, curve.sides[1])), cost, curve.errors[:, K].tolist())

    def _cost(self, c: Curves, K: torch.Tensor) -> torch.Tensor:
        ku, kv = c.kinds[self.name].sides
        return joint_numbers(K.clamp(max=ku), K.clamp(max=kv), c.n_out, c.n_in, len(c.ranks))

    def choose(self, c, price):
        errors = c.kinds[self.name].errors
        objective = (c.n_out + c.n_in) * errors.sum(0) + price * self._cost(c, torch.arange(errors.shape[1]))
        K = int(objective.argmin())
        return objective[K], self._choice(c, K)

    def plain(self, modules, budget):
        """The largest K whose numbers fit the storage ratio of each module's numbers."""
        ratio = budget / sum(c.numbers for c in modules)
        plan = []
        for c in modules:
            sizes = torch.arange(c.kinds[self.name].errors.shape[1])
            fits = self._cost(c, sizes) <= ratio * sum(c.ranks) * (c.n_out + c.n_in)
            plan.append(self._choice(c, int(sizes[fits].max()) if fits.any() else 0))
        return plan

    def planned(self, mod, choice, tasks):
        return mod.model_copy(update={"method": self.name, "size": choice.setting})

    def keeps_something_from(self, c):
        """One direction shared by all tasks: U (out x 1), V (in x 1) and one number per task."""
        return float(self._cost(c, torch.tensor(1))) / c.numbers

    def spectra_specs(self, mod, n):
        return {w: (torch.float64, (side, min(side, n * mod.rank))) for w, side in zip(ROOTS, _sides(mod))}

    def spectra(self, mod, raw, canonical):
        return {w: X.contiguous() for w, X in zip(ROOTS, grams(*canonical))}

    def bases_specs(self, mod, ranks):
        cap = joint_cap(mod.out_features, mod.in_features, ranks)
        return {s: (torch.float64, (n, min(cap, n, len(ranks) * mod.rank))) for s, n in zip(SIDES, _sides(mod))}

    def bases(self, mod, ranks, sites, specs):
        roots = ([read(w).double() for _, read in sites] for w in ROOTS)
        U, V = joint_bases(*roots, joint_cap(mod.out_features, mod.in_features, ranks))
        return {"U": U.contiguous(), "V": V.contiguous()}

    def curve_width(self, mod, bases):
        return max(bases(s)[1] for s in SIDES) + 1

    def site_curve(self, mod, raw, canonical, bases):
        return joint_errors(*canonical, *(bases(s).double() for s in SIDES))

    def federated_curve(self, S, rows, bases):
        return JointCurve(rows, tuple(bases(s)[1] for s in SIDES))
