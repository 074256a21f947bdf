"""Reversible baselines: T adapters -> one adapter per task (`out_dir/<task>/`) and what it costs."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rmm.adapter import LoraAdapter, write_adapter
from rmm.baselines import SUMMARY_FILE, register
from rmm.bundle import MergeOptions
from rmm.canonical import canonicalize
from rmm.errors import RMMError
from rmm.merge import merge, module_specs, revert, stack_factors
from rmm.metrics import relative_error

BUNDLE_DIR = "bundle"


def _check_names(adapters: list[LoraAdapter], reserved: set[str]) -> None:
    for a in adapters:
        if a.name in reserved:
            raise RMMError(f"task name {a.name!r} clashes with an output file of this method; rename the directory", file=a.path)


@register("truncate", "reversible", "Per-adapter rank truncation by SVD of dW (through QR of the factors); no sharing")
def truncate(adapters: list[LoraAdapter], out_dir: Path, *, rank=None, storage_ratio=None) -> dict:
    """Each module of each adapter keeps its top-k singular triplets, k = `rank` or
    floor(storage_ratio * r) (at least 1, at most r). Storage = sum over tasks and modules of
    k (out + in); the default is storage_ratio 0.5."""
    if rank is not None and storage_ratio is not None:
        raise RMMError("give either rank or storage_ratio, not both")
    if rank is None and storage_ratio is None:
        storage_ratio = 0.5
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise RMMError(f"rank must be a positive integer, got {rank!r}")
    if storage_ratio is not None and not 0 < storage_ratio:
        raise RMMError(f"storage_ratio must be > 0, got {storage_ratio}")
    _check_names(adapters, {SUMMARY_FILE})
    written, errors, stored = {}, {}, 0
    for a in adapters:  # one adapter, one module at a time
        factors, errs = {}, []
        for m, spec in a.modules.items():
            k = rank if rank is not None else max(1, math.floor(storage_ratio * spec.rank + 1e-9))
            k = min(k, spec.rank)
            B, A = a.load_factors(m)
            Bc, Ac = canonicalize(B, A)  # thin SVD of B A through QR, singular values descending
            factors[m] = (Bc[:, :k], Ac[:k])
            errs.append(relative_error(B, A, *factors[m]).item())
            stored += k * (spec.out_features + spec.in_features)
        write_adapter(out_dir / a.name, a.config, factors, a.load_extras(), a.dtype)
        written[a.name] = out_dir / a.name
        errors[a.name] = sum(errs) / len(errs)
    return {"adapters": written, "numbers_stored": stored, "errors": errors}


def _rmm(adapters: list[LoraAdapter], out_dir: Path, basis_size, storage_ratio, canonical: bool) -> dict:
    _check_names(adapters, {BUNDLE_DIR, SUMMARY_FILE})
    try:
        options = MergeOptions(basis_size=basis_size, storage_ratio=storage_ratio, canonicalize=canonical)
    except ValueError as e:
        raise RMMError(str(e)) from None
    manifest = merge([a.path for a in adapters], out_dir / BUNDLE_DIR, options, progress=False)
    written = revert(out_dir / BUNDLE_DIR, out_dir, progress=False)
    errors = {t: sum(e.values()) / len(e) for t, e in manifest.report.errors.items()}
    return {
        "adapters": written,
        "numbers_stored": manifest.report.storage.numbers_stored,
        "errors": errors,
        "bundle": out_dir / BUNDLE_DIR,
    }


@register("rmm-paper", "reversible", "RMM as in the paper: per-position basis on the raw factors (rmm.merge)")
def rmm_paper(adapters: list[LoraAdapter], out_dir: Path, *, basis_size=None, storage_ratio=None) -> dict:
    return _rmm(adapters, out_dir, basis_size, storage_ratio, canonical=False)


@register("rmm-canonical", "reversible", "RMM on canonicalised factors (rmm.merge with canonicalize=True)")
def rmm_canonical(adapters: list[LoraAdapter], out_dir: Path, *, basis_size=None, storage_ratio=None) -> dict:
    return _rmm(adapters, out_dir, basis_size, storage_ratio, canonical=True)


@register("joint", "reversible", "Joint subspace sharing: per module shared bases U, V and a small K x K core per task")
def joint(adapters: list[LoraAdapter], out_dir: Path, *, rank=None, storage_ratio=None) -> dict:
    """dW_t ~= U M_t V^T per module, U (out x K) and V (in x K) shared by all tasks, M_t (K x K) per task.

    U and V are the top-K singular vectors of the tasks' stacked dW column and row spaces (from the
    canonical factors: [U_1 S_1, ..., U_T S_T], never out x in), each capped at its side's size and
    at T r. Storage per module: K (out + in) + T K^2 (with the caps), so sharing pays when T is
    large and the tasks' subspaces overlap; exact once K covers both stacked spaces. K = `rank`, or
    the largest K whose storage fits `storage_ratio` of the module's original numbers (default 0.5).
    """
    if rank is not None and storage_ratio is not None:
        raise RMMError("give either rank or storage_ratio, not both")
    if rank is None and storage_ratio is None:
        storage_ratio = 0.5
    _check_names(adapters, {SUMMARY_FILE})
    T = len(adapters)
    factors: dict[str, dict] = {a.name: {} for a in adapters}
    errors: dict[str, list[float]] = {a.name: [] for a in adapters}
    stored = 0
    for mod in module_specs(adapters):
        B, A = stack_factors(adapters, mod, canonical=True)  # (T, out, r), (T, r, in): B = U sqrt(S), A = sqrt(S) V^T
        n_out, n_in, r = mod.out_features, mod.in_features, mod.rank
        original = sum(a.modules[mod.name].rank for a in adapters) * (n_out + n_in)
        # K directions on each side, capped by what that side has: U is out x Ku, V is in x Kv.
        def sides(k: int) -> tuple[int, int]:
            return min(k, n_out, T * r), min(k, n_in, T * r)

        def cost(k: int) -> int:
            ku, kv = sides(k)
            return ku * n_out + kv * n_in + T * ku * kv

        if rank is not None:
            K = rank
        else:
            K = max((k for k in range(T * r + 1) if cost(k) <= storage_ratio * original), default=0)
        Ku, Kv = sides(K)
        root = (B * B).sum(-2).sqrt().unsqueeze(-2)  # sqrt(S) per canonical direction
        U = torch.linalg.svd(torch.cat(list(B * root), dim=1), full_matrices=False)[0][:, :Ku]
        V = torch.linalg.svd(torch.cat(list(A * root.mT), dim=0), full_matrices=False)[2][:Kv].T
        M = (U.T @ B) @ (A @ V)  # (T, Ku, Kv)
        err = relative_error(B, A, U @ M, V.T.expand(T, Kv, n_in))
        stored += cost(K)
        for t, a in enumerate(adapters):
            factors[a.name][mod.name] = (U @ M[t], V.T.contiguous())
            errors[a.name].append(err[t].item())
    written = {}
    for a in adapters:
        write_adapter(out_dir / a.name, a.config, factors[a.name], a.load_extras(), a.dtype)
        written[a.name] = out_dir / a.name
    return {"adapters": written, "numbers_stored": stored, "errors": {t: sum(e) / len(e) for t, e in errors.items()}}


@register("auto", "reversible", "Per module: per-task truncation or joint sharing, sized under one global budget")
def auto(adapters: list[LoraAdapter], out_dir: Path, *, storage_ratio=0.5) -> dict:
    """Spend one storage budget where it removes the most dW error, module by module.

    For every module two families of options, each with its exact, data-free error curve:
    truncation (each task keeps its top-k canonical directions; relative error^2 = discarded
    singular energy) and joint sharing with K shared directions (error^2 = ||dW_t||^2 -
    ||U_K^T dW_t V_K||^2, since that is an orthogonal projection). A Lagrange multiplier prices
    storage: each module, and within truncation each task, takes the option minimising
    error + price x numbers; the price is bisected until the total fits the budget. The sum of
    squared relative errors over tasks and modules is what is minimised.
    """
    _check_names(adapters, {SUMMARY_FILE})
    modules = module_specs(adapters)
    curves = [_curves(adapters, mod) for mod in modules]
    budget = storage_ratio * sum(a.modules[m.name].rank * (m.out_features + m.in_features) for a in adapters for m in modules)

    def plan(price: float):
        choices = [_choose(c, price) for c in curves]
        return choices, sum(ch["cost"] for ch in choices)

    lo, hi = 0.0, 1.0
    while plan(hi)[1] > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if plan(mid)[1] > budget else (lo, mid)
    choices, stored = plan(hi)
    factors: dict[str, dict] = {a.name: {} for a in adapters}
    errors: dict[str, list[float]] = {a.name: [] for a in adapters}
    for mod, ch in zip(modules, choices):
        for t, a in enumerate(adapters):
            factors[a.name][mod.name] = ch["factors"](t)
            errors[a.name].append(float(ch["errors"][t]) ** 0.5)
    written = {}
    for a in adapters:
        write_adapter(out_dir / a.name, a.config, factors[a.name], a.load_extras(), a.dtype)
        written[a.name] = out_dir / a.name
    plan_summary = [{"module": m.name, "choice": ch["name"], "size": ch["size"]} for m, ch in zip(modules, choices)]
    return {"adapters": written, "numbers_stored": stored, "errors": {t: sum(e) / len(e) for t, e in errors.items()}, "plan": plan_summary}


def _curves(adapters: list[LoraAdapter], mod) -> dict:
    """Relative squared dW errors of every truncation rank and every joint size for one module."""
    T = len(adapters)
    B, A = stack_factors(adapters, mod, canonical=True)
    n_out, n_in, r = mod.out_features, mod.in_features, mod.rank
    S = (B * B).sum(-2)  # (T, r): singular values of dW_t, descending
    energy = (S * S).sum(-1).clamp_min(torch.finfo(S.dtype).tiny)  # ||dW_t||^2
    tail = (S * S).flip(-1).cumsum(-1).flip(-1)  # tail[:, k] = energy beyond the top k
    trunc = torch.cat([tail, torch.zeros(T, 1, dtype=S.dtype)], dim=1) / energy[:, None]  # (T, r + 1)
    root = S.sqrt().unsqueeze(-2)
    U = torch.linalg.svd(torch.cat(list(B * root), dim=1), full_matrices=False)[0]
    V = torch.linalg.svd(torch.cat(list(A * root.mT), dim=0), full_matrices=False)[2].T
    M = (U.T @ B) @ (A @ V)  # (T, Ku, Kv) for the largest sizes; smaller K take its top-left block
    k_max = max(U.shape[1], V.shape[1])
    kept = [torch.zeros(T, dtype=S.dtype)] + [(M[:, : min(k, U.shape[1]), : min(k, V.shape[1])] ** 2).sum((-2, -1)) for k in range(1, k_max + 1)]
    joint = (1 - torch.stack(kept, dim=1) / energy[:, None]).clamp_min(0)  # (T, k_max + 1)
    return {"T": T, "B": B, "A": A, "U": U, "V": V, "M": M, "trunc": trunc, "joint": joint, "n": n_out + n_in, "n_out": n_out, "n_in": n_in}


def _choose(c: dict, price: float) -> dict:
    """The cheaper (error + price x numbers) of per-task truncation and the best joint size."""
    per_task = c["trunc"] + price * c["n"] * torch.arange(c["trunc"].shape[1], dtype=c["trunc"].dtype)
    ks = per_task.argmin(dim=1)  # each task its own rank
    trunc_err = c["trunc"].gather(1, ks[:, None]).squeeze(1)
    trunc_cost = int(ks.sum()) * c["n"]
    sizes = torch.arange(c["joint"].shape[1])
    ku, kv = sizes.clamp(max=c["U"].shape[1]), sizes.clamp(max=c["V"].shape[1])
    joint_cost = ku * c["n_out"] + kv * c["n_in"] + c["T"] * ku * kv
    objective = c["joint"].sum(0) + price * joint_cost
    K = int(objective.argmin())
    if trunc_err.sum() + price * trunc_cost <= objective[K]:
        B, A = c["B"], c["A"]
        return {"name": "truncate", "size": ks.tolist(), "cost": trunc_cost, "errors": trunc_err.tolist(),
                "factors": lambda t: (B[t][:, : ks[t]], A[t][: ks[t]])}
    U, V, M = c["U"][:, : ku[K]], c["V"][:, : kv[K]], c["M"][:, : ku[K], : kv[K]]
    return {"name": "joint", "size": K, "cost": int(joint_cost[K]), "errors": c["joint"][:, K].tolist(),
            "factors": lambda t: (U @ M[t], V.T.contiguous())}
