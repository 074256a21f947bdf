"""Gauge-free LoRA factors: the same dW always gives the same (B, A).

A LoRA pair has a gauge freedom (`A -> R A`, `B -> B R^-1` leave dW unchanged), so raw factors of
adapters trained from different initialisations are poorly aligned position by position. The
canonical form is the thin SVD of `B @ A`, computed through QR of both factors (never forming the
out x in product): `B = U sqrt(S)`, `A = sqrt(S) V^T`, with each singular pair's sign fixed so the
largest-magnitude entry of its U column is positive.
"""

from __future__ import annotations

import torch


def canonicalize(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical (B, A) with the same `B @ A`; batched over leading dimensions, rank kept."""
    r = B.shape[-1]
    Qb, Rb = torch.linalg.qr(B)  # (..., out, k1), (..., k1, r)
    Qa, Ra = torch.linalg.qr(A.mT)  # (..., in, k2), (..., k2, r)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.mT)  # core (k1 x k2)
    k = S.shape[-1]
    U = Qb @ Uc[..., :, :k]
    del Qb  # the (T, out, r) blocks are the memory of a large module: one at a time beyond the inputs
    V = Qa @ Vch[..., :k, :].mT
    del Qa
    pivot = torch.gather(U, -2, U.abs().argmax(dim=-2, keepdim=True))
    scale = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype) * S.sqrt().unsqueeze(-2)
    B_c, A_c = U.mul_(scale), V.mul_(scale).mT
    if k < r:  # a side thinner than r: pad the missing (zero) singular directions
        B_c = torch.nn.functional.pad(B_c, (0, r - k))
        A_c = torch.nn.functional.pad(A_c, (0, 0, 0, r - k))
    return B_c, A_c


def singular_values(B: torch.Tensor) -> torch.Tensor:
    """(T, r): the singular values of each dW_t, from its canonical B = U sqrt(S)."""
    return (B * B).sum(-2)
