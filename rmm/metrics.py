"""Errors of dW computed from factors, never forming the out x in matrices."""

from __future__ import annotations

import torch


def frobenius_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T)), batched over leading dimensions."""
    return ((B1.mT @ B2) * (A1 @ A2.mT)).sum((-2, -1))


def relative_error(B: torch.Tensor, A: torch.Tensor, B_hat: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """||B A - B_hat A_hat||_F / ||B A||_F (0 where dW is 0 and so is the error)."""
    ref = frobenius_inner(B, A, B, A)
    err = ref - 2 * frobenius_inner(B, A, B_hat, A_hat) + frobenius_inner(B_hat, A_hat, B_hat, A_hat)
    err = err.clamp_min(0)
    return torch.where(ref > 0, (err / ref.clamp_min(torch.finfo(ref.dtype).tiny)).sqrt(), err.sqrt())
