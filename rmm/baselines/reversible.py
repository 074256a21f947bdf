"""Reversible baselines: T adapters -> one adapter per task (`out_dir/<task>/`) and what it costs."""

from __future__ import annotations

import math
from pathlib import Path

from rmm.adapter import LoraAdapter, write_adapter
from rmm.baselines import SUMMARY_FILE, register
from rmm.bundle import MergeOptions
from rmm.canonical import canonicalize
from rmm.errors import RMMError
from rmm.merge import merge, revert
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
