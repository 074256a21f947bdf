"""What `rmm inspect` reports about a bundle, as plain data (the CLI renders it)."""

from __future__ import annotations

from pathlib import Path

from rmm.bundle import BASIS_FILE, Manifest, bundle_files, checked_file, coefficients_file, read_manifest
from rmm.storage import KINDS, kind


def inspect_bundle(bundle: Path, manifest: Manifest | None = None) -> dict:
    """Everything `rmm inspect` shows, as plain data: storage by formula and on disk, allocation, errors, energy.

    `manifest`: the one `merge` has just written, whose files it hashed as it wrote them; without it the
    bundle's own, every file checked against it (a bundle read from elsewhere).
    """
    m = manifest
    if m is None:
        m = read_manifest(bundle)
        for file in bundle_files(m.tasks):
            checked_file(bundle, m, bundle / file)
    T = len(m.tasks)
    formula = sum(kind(mod).stored_numbers(mod, T) for mod in m.modules)
    on_disk = sum(
        f.stat().st_size for f in [bundle / BASIS_FILE] + [coefficients_file(bundle, t.name) for t in m.tasks]
    )
    s = m.report.storage
    ps = sorted({p for mod in m.modules if (p := kind(mod).basis_size(mod)) is not None})
    return {
        "bundle": str(bundle),
        "tool_version": m.tool_version,
        "tasks_count": T,
        "modules_count": len(m.modules),
        "p": ps[0] if len(ps) == 1 else ps,
        "allocation": {name: sum(mod.method == name for mod in m.modules) for name in KINDS},
        "options": m.options.model_dump(),
        "storage": {
            "ratio_formula": formula / s.numbers_original,
            "ratio_counted": s.ratio,
            "bytes_on_disk": on_disk,
            "bytes_original": s.bytes_original,
            "ratio_bytes_on_disk": on_disk / s.bytes_original,
            "dtype": m.storage_dtype,
        },
        # A coordinator's bundle of published coefficients has no errors: only the sites hold the originals.
        "tasks": {
            t: {"mean_error": sum(e.values()) / len(e), "max_error": max(e.values()), "worst_module": max(e, key=e.get)}
            for t, e in m.report.errors.items()
            if e
        },
        "modules": {
            mod.name: {
                "shape": f"{mod.out_features}x{mod.in_features}",
                "rank": mod.rank,
                "p": mod.p,
                "method": mod.method,
                "stored": kind(mod).describe(mod),
                "ranks": mod.ranks,
                "size": mod.size,
                # per-position sharing: share of the spread around the mean kept per factor; else share of sum ||dW||^2
                "energy": m.report.energy[mod.name],
                "max_error": max((e[mod.name] for e in m.report.errors.values() if mod.name in e), default=None),
            }
            for mod in m.modules
        },
        "seconds": m.report.seconds,
        # With calibration: every candidate plan, what it cost each task's outputs, and the one kept.
        "calibration": m.report.calibration.model_dump() if m.report.calibration else None,
    }
