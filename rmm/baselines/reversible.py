"""Reversible baselines: T adapters -> one adapter per task (`out_dir/<task>/`) and what it costs."""

from __future__ import annotations

from pathlib import Path

from rmm.adapter import LoraAdapter, write_adapter
from rmm.baselines import SUMMARY_FILE, register
from rmm.bundle import MergeOptions
from rmm.calibrate import EXAMPLES, Calibration
from rmm.canonical import canonicalize
from rmm.errors import RMMError
from rmm.merge import merge, revert
from rmm.metrics import relative_error
from rmm.plan import module_specs, stack_factors
from rmm.storage.joint import joint_bases, joint_numbers, stacked_roots
from rmm.storage.truncate import plain_rank

BUNDLE_DIR = "bundle"


def _check_names(adapters: list[LoraAdapter], reserved: set[str]) -> None:
    for a in adapters:
        if a.name in reserved:
            raise RMMError(
                f"task name {a.name!r} clashes with an output file of this method; rename the directory", file=a.path
            )


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
            k = min(rank, spec.rank) if rank is not None else plain_rank(spec.rank, storage_ratio)
            B, A = a.load_factors(m)
            Bc, Ac = canonicalize(B, A)  # thin SVD of B A through QR, singular values descending
            factors[m] = (Bc[:, :k], Ac[:k])
            errs.append(relative_error(B, A, *factors[m]).item())
            stored += k * (spec.out_features + spec.in_features)
        write_adapter(out_dir / a.name, a.config, factors, a.load_extras(), a.dtype)
        written[a.name] = out_dir / a.name
        errors[a.name] = sum(errs) / len(errs)
    return {"adapters": written, "numbers_stored": stored, "errors": errors}


def _via_merge(adapters: list[LoraAdapter], out_dir: Path, calibration: Calibration | None = None, **options) -> dict:
    """Run `rmm.merge` (with `calibration`, if given) into out_dir/bundle and revert every task next to it."""
    _check_names(adapters, {BUNDLE_DIR, SUMMARY_FILE})
    try:
        options = MergeOptions(**options)
    except ValueError as e:
        raise RMMError(str(e)) from None
    manifest = merge([a.path for a in adapters], out_dir / BUNDLE_DIR, options, calibration=calibration, progress=False)
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
    return _via_merge(adapters, out_dir, method="rmm-paper", basis_size=basis_size, storage_ratio=storage_ratio)


@register("rmm-canonical", "reversible", "RMM on canonicalised factors (rmm.merge with canonicalize=True)")
def rmm_canonical(adapters: list[LoraAdapter], out_dir: Path, *, basis_size=None, storage_ratio=None) -> dict:
    return _via_merge(
        adapters, out_dir, method="rmm-paper", basis_size=basis_size, storage_ratio=storage_ratio, canonicalize=True
    )


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
            return joint_numbers(*sides(k), n_out, n_in, T)

        if rank is not None:
            K = rank
        else:
            K = max((k for k in range(T * r + 1) if cost(k) <= storage_ratio * original), default=0)
        Ku, Kv = sides(K)
        U, V = joint_bases(*([X] for X in stacked_roots(B, A)), max(Ku, Kv))
        U, V = U[:, :Ku], V[:, :Kv]
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


@register(
    "auto",
    "reversible",
    "rmm merge's default: per module, per-task truncation, joint or per-position sharing "
    "under one budget (rmm.allocate)",
)
def auto(
    adapters: list[LoraAdapter],
    out_dir: Path,
    *,
    storage_ratio=0.5,
    base=None,
    calibration=None,
    calibration_examples=EXAMPLES,
) -> dict:
    """With `base` (a transformers model directory) and `calibration` (a directory of <task>.jsonl examples), the
    plan is the candidate that changes each task's outputs on its first `calibration_examples` examples the least
    (`rmm merge --base --calibration`); without them, the data-free default."""
    if (base is None) != (calibration is None):
        raise RMMError("calibration needs both base (the model directory) and calibration (the examples' directory)")
    if isinstance(calibration_examples, bool) or not isinstance(calibration_examples, int):
        raise RMMError(f"calibration_examples must be a whole number, got {calibration_examples!r}")
    given = Calibration(Path(base), Path(calibration), calibration_examples) if base is not None else None
    return _via_merge(adapters, out_dir, given, method="auto", storage_ratio=storage_ratio)
