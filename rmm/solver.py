"""The closed-form RMM solver, per position, batched over all positions of a module.

A *position* is one row of B or one column of A: an r-vector per task. For one factor of one
module we hold the T tasks' vectors as X with shape (T, P, r), P the number of positions
(`out` for B, `in` for A, whose columns we store as the rows of A^T).

Per position the best rank-p fit of the centred task vectors (Eckart-Young) depends on the tasks
only through the additive moments n, S1 = sum_t x_t and S2 = sum_t x_t x_t^T, so sites can send
moments and a coordinator can add them: the federated basis is the centralised one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Additive sufficient statistics of one factor of one module, in float64."""

    n: int
    s1: torch.Tensor  # (P, r)
    s2: torch.Tensor  # (P, r, r)

    @classmethod
    def of(cls, X: torch.Tensor) -> "Moments":
        X = X.to(torch.float64)
        per_position = X.transpose(0, 1).contiguous()  # (P, T, r): one batched matmul, no einsum
        return cls(X.shape[0], X.sum(0), per_position.mT @ per_position)

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2)


@dataclass
class Basis:
    """Per-position mean and top-p basis, with the full eigen-spectrum for energy figures."""

    mean: torch.Tensor  # (P, r)
    vectors: torch.Tensor  # (P, r, p), orthonormal columns
    eigvals: torch.Tensor  # (P, r), descending, of the centred scatter

    @property
    def p(self) -> int:
        return self.vectors.shape[-1]


def solve(m: Moments, p: int) -> Basis:
    """Mean and top-p eigenvectors of the centred scatter `S2 - n mu mu^T`, one batched eigh."""
    mu = m.s1 / m.n
    scatter = m.s2 - m.n * mu[:, :, None] * mu[:, None, :]
    scatter = (scatter + scatter.mT) / 2  # exact symmetry for eigh
    evals, evecs = torch.linalg.eigh(scatter)  # ascending
    return Basis(mu, _signed(evecs[..., evecs.shape[-1] - p :].flip(-1)), evals.flip(-1).clamp_min(0))


def basis_of(X: torch.Tensor, p: int) -> Basis:
    """`solve(Moments.of(X), p)`, from the tasks' vectors X (T, P, r) themselves.

    With fewer tasks than the rank the centred scatter has rank below T, and its eigenvectors come from a T x T
    problem per position: Q R = the centred vectors (r x T), U = Q times the eigenvectors of R R^T (orthonormal
    as they are, whatever the spectrum). That is much cheaper than the r x r eigh when r >> T, the usual case
    when a few adapters of rank 32 to 128 are merged (4096 positions, r = 64 and T = 8: 12x;
    `benchmarks/solver_speed.py`)."""
    T, r = X.shape[0], X.shape[-1]
    if T >= r or p >= T:
        return solve(Moments.of(X), p)
    X = X.to(torch.float64)
    mu = X.sum(0) / T
    Q, R = torch.linalg.qr((X - mu).permute(1, 2, 0))  # (P, r, T), (P, T, T)
    core = R @ R.mT
    evals, evecs = torch.linalg.eigh((core + core.mT) / 2)  # ascending
    U = Q @ evecs[..., T - p :].flip(-1)
    return Basis(mu, _signed(U), torch.nn.functional.pad(evals.flip(-1).clamp_min(0), (0, r - T)))


def _signed(U: torch.Tensor) -> torch.Tensor:
    """Deterministic signs: the largest-magnitude entry of every basis vector (P, r, p) is positive."""
    pivot = torch.gather(U, 1, U.abs().argmax(dim=1, keepdim=True))
    return U * torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)


def coefficients(mean: torch.Tensor, vectors: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """c_t = U^T (x_t - mu) for every task and position: (T, P, p), in float64."""
    return torch.einsum("prk,tpr->tpk", vectors.to(torch.float64), X.to(torch.float64) - mean.to(torch.float64))


def reconstruct(mean: torch.Tensor, vectors: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
    """x_t = mu + U c_t; `coefs` is (P, p) for one task or (T, P, p) for several."""
    return mean + torch.einsum("prk,...pk->...pr", vectors, coefs)


def energy_kept(X: torch.Tensor, mean: torch.Tensor, fit: torch.Tensor) -> float:
    """Share of the tasks' spread around the mean that the fit keeps (1 - residual / spread).

    With the tasks' own basis this is the top-p share of the centred scatter's eigenvalues.
    """
    spread = ((X - mean) ** 2).sum().item()
    return 1.0 if spread <= 0 else 1.0 - ((X - fit) ** 2).sum().item() / spread


def storage_numbers(positions: int, rank: int, tasks: int, p: int) -> int:
    """Numbers stored for one factor: mean and basis per position, plus p coefficients per task."""
    return positions * (p * (rank + tasks) + rank)


def storage_ratio(rank: int, tasks: int, p: int) -> float:
    """The storage ratio `(p (r + T) + r) / (r T)`, relative to keeping all T adapters' factors."""
    return (p * (rank + tasks) + rank) / (rank * tasks)


# --- exact and sketched summaries of one factor's positions, as a site uploads them (`rmm.payload`) ---------
#
# `moments`: s1 (P, r) and the upper triangle of s2 (P, r (r + 1) / 2); `sketch`: the site's mean (P, r) and
# qs (P, r, q), its centred scatter's top-q eigenvectors times the roots of their eigenvalues; `factors`: the
# vectors x (n, P, r) themselves. Each decodes to the same additive `Moments`.


def encode(X: torch.Tensor, kind: str, q: int | None) -> list[tuple[str, torch.Tensor]]:
    """(suffix, tensor) of the summary `kind` of X (n, P, r)."""
    if kind == "factors":
        return [("x", X)]
    if kind == "moments":
        m = Moments.of(X)
        rows, cols = torch.triu_indices(X.shape[-1], X.shape[-1])
        return [("s1", m.s1), ("s2", m.s2[:, rows, cols])]
    k = sketch_rank(q, X.shape[-1], X.shape[0])
    basis = basis_of(X, k)
    return [("mean", basis.mean), ("qs", basis.vectors * basis.eigvals[:, :k].sqrt().unsqueeze(-2))]


def summary_specs(P: int, r: int, n: int, kind: str, q: int | None) -> dict:
    """suffix -> (dtype, shape) of one factor's `moments` or `sketch` for n tasks at P positions of rank r."""
    if kind == "moments":
        return {"s1": (torch.float64, (P, r)), "s2": (torch.float64, (P, r * (r + 1) // 2))}
    return {"mean": (torch.float64, (P, r)), "qs": (torch.float64, (P, r, sketch_rank(q, r, n)))}


def smallest_exact(n: int, r: int) -> tuple[str, int | None]:
    """The exact per-position summary with the fewest numbers for n tasks of rank r: a full-rank
    sketch (r n per position) below (r + 3) / 2 tasks, else the moments (r (r + 3) / 2)."""
    return ("sketch", max(1, n - 1)) if n * r < r * (r + 3) // 2 else ("moments", None)


def sketch_rank(q: int, r: int, n: int) -> int:
    """n centred vectors span at most n - 1 directions: more columns would only carry zeros."""
    return min(q, r, n - 1)


def decode(kind: str, n: int, r: int, get) -> Moments:
    """The moments of n tasks from their summary `kind`; `get(suffix)` reads its tensors as float64."""
    if kind == "factors":
        return Moments.of(get("x"))
    if kind == "moments":
        packed = get("s2")
        rows, cols = torch.triu_indices(r, r)
        s2 = packed.new_zeros(packed.shape[0], r, r, dtype=torch.float64)
        rows, cols = rows.to(packed.device), cols.to(packed.device)
        s2[:, rows, cols] = packed
        s2[:, cols, rows] = packed
        return Moments(n, get("s1"), s2)
    mean, qs = get("mean"), get("qs")
    return Moments(n, n * mean, qs @ qs.mT + n * mean[:, :, None] * mean[:, None, :])
