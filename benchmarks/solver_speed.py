#!/usr/bin/env python
"""The sizing's two bases, each against the way it was computed before, on one thread, in one process.

- Per-position bases of one factor (4096 positions): `rmm.solver.basis_of` (a T x T problem per position when
  there are fewer tasks than the rank) against `solve(Moments.of(X))` (the r x r eigh of the moments).
- Joint bases of one side: `rmm.storage.joint.top_left_vectors` (the smaller Gram's eigh) against a thin SVD of the
  stacked roots, at the 1 GiB benchmark's shape (4096 x 16 tasks x r 16) and a Llama MLP's at T = 64
  (14336 x 64 x 16), keeping 3/4 of the columns.

Best of `--repeats`. Writes benchmarks/results/solver_speed.{md,json}.

    .venv/bin/python benchmarks/solver_speed.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rmm.solver import Moments, basis_of, solve  # noqa: E402
from rmm.storage.joint import top_left_vectors  # noqa: E402

POSITIONS = 4096
PER_POSITION = [(4, 16), (8, 32), (8, 64), (16, 64), (4, 128), (16, 16)]  # (T, r)
JOINT = [(4096, 16 * 16), (14336, 64 * 16)]  # (side, T r)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T, r in PER_POSITION:
        X = torch.randn(T, POSITIONS, r, generator=gen, dtype=torch.float64)
        p = min(r, T - 1)
        before = best(lambda: solve(Moments.of(X), p), args.repeats)
        now = best(lambda: basis_of(X, p), args.repeats)
        rows.append(dict(what=f"per-position, T = {T}, r = {r}", before=before, now=now))
    for side, q in JOINT:
        C = torch.randn(side, q, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, q, dtype=torch.float64)
        cap = 3 * q // 4
        before = best(lambda: torch.linalg.svd(C, full_matrices=False)[0][:, :cap], args.repeats)
        now = best(lambda: top_left_vectors(C, cap), args.repeats)
        rows.append(dict(what=f"joint side, {side} x {q}, {cap} columns", before=before, now=now))
    lines = [
        f"`{' '.join(['python benchmarks/solver_speed.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"(one thread, best of {args.repeats}; torch {torch.__version__})",
        "",
        "| basis | before | now | speed-up |",
        "|---|---:|---:|---:|",
        *(f"| {r['what']} | {r['before']:.3f} s | {r['now']:.3f} s | {r['before'] / r['now']:.1f}x |" for r in rows),
    ]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "solver_speed.md").write_text("\n".join(lines) + "\n")
    (args.results_dir / "solver_speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
