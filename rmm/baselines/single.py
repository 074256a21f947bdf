"""Single-adapter baselines: T adapters -> one merged adapter, merged module by module.

The elementwise merges are PEFT's own (`peft.utils.merge_utils`), as its `add_weighted_adapter`
calls them; only where they are applied differs: to A and B separately (the paper's baselines,
PEFT's `linear` / `ties` / `dare_linear`), to dW (PEFT's `svd` / `ties_svd` / `dare_linear_svd`,
re-factorised by truncated SVD), or to the small Core Space matrices.

Output rank (`rank`): None (default) keeps the inputs' rank r, an int picks k, "full" truncates
nothing (rank min(out, in) for dW methods, the core rank for Core Space methods).
"""

from __future__ import annotations

import warnings

import torch
from peft.utils.merge_utils import dare_linear, task_arithmetic, ties

from rmm.baselines import ModuleContext, register
from rmm.baselines.linalg import core_space, from_core, out_rank, refactor_dense, svt
from rmm.errors import RMMError

Factors = tuple[torch.Tensor, torch.Tensor]


def _density(density: float) -> float:
    if not 0 < density <= 1:
        raise RMMError(f"density must be in (0, 1], got {density}")
    return float(density)


def _quiet(fn, *args):
    """PEFT warns on every call with density >= 1 (then it does not prune, as wanted)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        return fn(*args)


def _seeded(seed: int, ctx: ModuleContext, fn, *args):
    """Run a random merge with a fixed seed per module, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + ctx.index)
        return fn(*args)


def _on_factors(merge_one, B: torch.Tensor, A: torch.Tensor, w: torch.Tensor) -> Factors:
    """PEFT's factor-wise rule: sqrt(|w|) on B, sign(w) sqrt(|w|) on A, then merge each factor."""
    root = w.abs().sqrt()
    return merge_one(list(B), root), merge_one(list(A), root * torch.where(w < 0, -1.0, 1.0).to(w.dtype))


def _on_dw(merge_one, B: torch.Tensor, A: torch.Tensor, ctx: ModuleContext, rank) -> Factors:
    """Merge dW_t = B_t A_t (formed one module at a time), then truncated SVD to the output rank."""
    merged = merge_one(list(B @ A), ctx.weights)
    return refactor_dense(merged, out_rank(rank, ctx, min(merged.shape)))


def _on_core(merge_one, B: torch.Tensor, A: torch.Tensor, ctx: ModuleContext, rank) -> Factors:
    U_B, cores, V_A = core_space(B, A)
    merged = merge_one(list(cores), ctx.weights)
    return from_core(U_B, merged, V_A, out_rank(rank, ctx, min(merged.shape)))


# --- on A and B separately (the paper's baselines) ------------------------------------------------


@register("ta-factors", "single", "Task Arithmetic on A and B separately (PEFT add_weighted_adapter 'linear')")
def ta_factors(B, A, ctx) -> Factors:
    return _on_factors(task_arithmetic, B, A, ctx.weights)


@register(
    "ties-factors",
    "single",
    "TIES on A and B separately (PEFT 'ties': trim, elect sign, disjoint mean)",
    default_scale="1",
)
def ties_factors(B, A, ctx, *, density=0.2, majority_sign_method="total") -> Factors:
    d = _density(density)
    return _on_factors(lambda X, w: _quiet(ties, X, w, d, majority_sign_method), B, A, ctx.weights)


@register("dare-factors", "single", "DARE on A and B separately (PEFT 'dare_linear': random drop, rescale, sum)")
def dare_factors(B, A, ctx, *, density=0.5, seed=0) -> Factors:
    d = _density(density)
    return _seeded(seed, ctx, _on_factors, lambda X, w: _quiet(dare_linear, X, w, d), B, A, ctx.weights)


# --- on dW, re-factorised by truncated SVD --------------------------------------------------------


@register("ta-dw", "single", "Task Arithmetic on dW, truncated SVD to rank r (PEFT 'svd')")
def ta_dw(B, A, ctx, *, rank=None) -> Factors:
    return _on_dw(task_arithmetic, B, A, ctx, rank)


@register("ties-dw", "single", "TIES on dW, truncated SVD to rank r (PEFT 'ties_svd')", default_scale="1")
def ties_dw(B, A, ctx, *, density=0.2, majority_sign_method="total", rank=None) -> Factors:
    d = _density(density)
    return _on_dw(lambda X, w: _quiet(ties, X, w, d, majority_sign_method), B, A, ctx, rank)


@register("dare-dw", "single", "DARE on dW, truncated SVD to rank r (PEFT 'dare_linear_svd')")
def dare_dw(B, A, ctx, *, density=0.5, seed=0, rank=None) -> Factors:
    d = _density(density)
    return _seeded(seed, ctx, _on_dw, lambda X, w: _quiet(dare_linear, X, w, d), B, A, ctx, rank)


# --- Core Space -----------------------------------------------------------------------------------


@register("core-space-ta", "single", "Core Space merging with Task Arithmetic on the cores (equals TA on dW)")
def core_space_ta(B, A, ctx, *, rank=None) -> Factors:
    return _on_core(task_arithmetic, B, A, ctx, rank)


@register("core-space-ties", "single", "Core Space merging with TIES on the cores", default_scale="1")
def core_space_ties(B, A, ctx, *, density=0.2, majority_sign_method="total", rank=None) -> Factors:
    d = _density(density)
    return _on_core(lambda X, w: _quiet(ties, X, w, d, majority_sign_method), B, A, ctx, rank)


# --- LoRE-Merging ---------------------------------------------------------------------------------


@register("lore", "single", "LoRE-Merging: shared part m plus low-rank task residuals (SVT), in Core Space; merged = m")
def lore(B, A, ctx, *, tau=0.1, iterations=10, rank=None) -> Factors:
    """Alternate m = weighted mean_t (M_t - D_t) and D_t = SVT_theta(M_t - m) on the cores.

    `tau` is relative: theta = tau * max_t ||M_t||_2 (the largest task spectral norm of the module).
    The cores are an isometry of dW, so this is LoRE on dW exactly. The merged update is
    (sum_t w_t) m, so tau = 0 gives Task Arithmetic with the same weights.
    """
    if tau < 0 or iterations < 1:
        raise RMMError(f"lore needs tau >= 0 and iterations >= 1, got tau={tau}, iterations={iterations}")
    U_B, cores, V_A = core_space(B, A)
    w = ctx.weights
    total = w.sum()
    if total.abs() < 1e-12:
        raise RMMError("lore needs weights with a non-zero sum")
    theta = float(tau) * torch.linalg.matrix_norm(cores, ord=2).max().item()
    D = torch.zeros_like(cores)
    for _ in range(int(iterations)):
        m = torch.einsum("t,tij->ij", w, cores - D) / total
        D = torch.stack([svt(M - m, theta) for M in cores])
    m = torch.einsum("t,tij->ij", w, cores - D) / total
    return from_core(U_B, total * m, V_A, out_rank(rank, ctx, min(m.shape)))
