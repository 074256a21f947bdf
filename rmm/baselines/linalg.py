"""Small linear algebra shared by the baselines: SVD re-factorisation and Core Space bases."""

from __future__ import annotations

import torch


def out_rank(rank, ctx, full: int) -> int:
    """Output rank: None -> the module's input rank r; "full" -> `full` (no truncation); else int."""
    if rank is None:
        return min(ctx.rank, full)
    if rank == "full":
        return full
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        from rmm.errors import RMMError

        raise RMMError(f"rank must be a positive integer, 'full' or None, got {rank!r}")
    return min(rank, full)


def split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced LoRA factors of the top-k SVD: B = U_k sqrt(S_k), A = sqrt(S_k) Vh_k."""
    root = S[:k].clamp_min(0).sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def refactor_dense(dW: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors of an out x in matrix by truncated SVD (Eckart-Young)."""
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return split(U, S, Vh, k)


def _range(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of X (numerical rank, at least one column)."""
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    tol = S.max().clamp_min(torch.finfo(S.dtype).tiny) * max(X.shape) * torch.finfo(S.dtype).eps
    keep = max(1, int((S > tol).sum()))
    return U[:, :keep]


def core_space(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Core Space of T LoRA pairs: (U_B (out, R_B), cores (T, R_B, R_A), V_A (in, R_A)).

    U_B spans the columns of [B_1 .. B_T], V_A the rows of [A_1; ..; A_T] (R <= T r each), so
    dW_t = U_B M_t V_A^T exactly with M_t = U_B^T B_t A_t V_A; nothing out x in is formed.
    """
    T, n_out, r = B.shape
    U_B = _range(B.permute(1, 0, 2).reshape(n_out, T * r))
    V_A = _range(A.reshape(T * r, -1).mT)
    cores = (U_B.mT @ B) @ (A @ V_A)
    return U_B, cores, V_A


def from_core(U_B: torch.Tensor, M: torch.Tensor, V_A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors of U_B M V_A^T, through the SVD of the small core M."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    B, A = split(U, S, Vh, k)
    return U_B @ B, A @ V_A.mT


def svt(X: torch.Tensor, tau: float) -> torch.Tensor:
    """Singular value thresholding: U max(S - tau, 0) V^T (the prox of tau * nuclear norm)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return (U * (S - tau).clamp_min(0)) @ Vh
