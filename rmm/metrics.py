"""Errors of dW computed from factors, never forming the out x in matrices."""

from __future__ import annotations

import torch


def frobenius_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T)), batched over leading dimensions."""
    return ((B1.mT @ B2) * (A1 @ A2.mT)).sum((-2, -1))


def relative_error(B: torch.Tensor, A: torch.Tensor, B_hat: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """||B A - B_hat A_hat||_F / ||B A||_F (0 where dW is 0 and so is the error)."""
    own = frobenius_inner(B, A, B, A)
    fit = frobenius_inner(B_hat, A_hat, B_hat, A_hat)
    return squared_relative(own, frobenius_inner(B, A, B_hat, A_hat), fit).sqrt()


def squared_relative(own: torch.Tensor, cross: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """||dW - fit||^2 / ||dW||^2 from <dW, dW>, <dW, fit> and <fit, fit> (the absolute error where dW is 0)."""
    err = (own - 2 * cross + fit).clamp_min(0)
    return torch.where(own > 0, err / own.clamp_min(torch.finfo(own.dtype).tiny), err)
