"""What `rmm inspect` reports about a bundle, as plain data (the CLI renders it)."""

from __future__ import annotations

from pathlib import Path

from rmm.bundle import BASIS_FILE, coefficients_file, read_manifest
from rmm.solver import storage_numbers


def inspect_bundle(bundle: Path) -> dict:
    """Everything `rmm inspect` shows, as plain data: storage by formula and on disk, errors, energy."""
    m = read_manifest(bundle)
    T = len(m.tasks)
    formula = sum(storage_numbers(n, mod.rank, T, mod.p) for mod in m.modules for n in (mod.out_features, mod.in_features))
    files = [bundle / BASIS_FILE] + [coefficients_file(bundle, t.name) for t in m.tasks]
    s = m.report.storage
    ps = sorted({mod.p for mod in m.modules})
    return {
        "bundle": str(bundle),
        "tool_version": m.tool_version,
        "tasks_count": T,
        "modules_count": len(m.modules),
        "p": ps[0] if len(ps) == 1 else ps,
        "options": m.options.model_dump(),
        "storage": {
            "ratio_formula": formula / s.numbers_original,
            "ratio_counted": s.ratio,
            "bytes_on_disk": sum(f.stat().st_size for f in files),
            "bytes_original": s.bytes_original,
            "ratio_bytes_on_disk": sum(f.stat().st_size for f in files) / s.bytes_original,
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
                "energy_B": m.report.energy[mod.name]["B"],
                "energy_A": m.report.energy[mod.name]["A"],
                "max_error": max((e[mod.name] for e in m.report.errors.values() if mod.name in e), default=None),
            }
            for mod in m.modules
        },
        "seconds": m.report.seconds,
    }
