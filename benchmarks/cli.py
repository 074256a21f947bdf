"""`rmm bench quality`: the quality benchmark, from a source checkout (it trains and caches its own
adapters). Speed and memory: `make bench` (benchmarks/merge_speed.py)."""

from __future__ import annotations

from pathlib import Path


def register(verbs) -> None:
    bench = verbs.add_parser("bench", help="benchmarks: quality suites against every baseline")
    bench_verbs = bench.add_subparsers(dest="bench_verb", required=True, metavar="VERB")
    p = bench_verbs.add_parser(
        "quality", help="build (once, cached) and score the quality suites; results in benchmarks/results/"
    )
    p.add_argument("suites", nargs="*", metavar="SUITE", help="few, many, hetero, pt-svd, released (default: all)")
    p.add_argument(
        "--work",
        type=Path,
        default=Path(".cache/quality/work"),
        metavar="DIR",
        help="scratch space for candidates' outputs",
    )
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="score only these (others are listed if cached)")
    p.add_argument(
        "--ratios", nargs="+", type=float, metavar="R", help="score reversible methods only at these budgets"
    )
    p.set_defaults(run=_quality)
    p = bench_verbs.add_parser(
        "calibration",
        help="every candidate plan's measured gain against its dW objective and calibrated KL, per suite and budget; "
        "results in benchmarks/results/calibration.{json,md}",
    )
    p.add_argument("suites", nargs="*", metavar="SUITE", help="quality suites (default: few)")
    p.add_argument("--work", type=Path, default=Path(".cache/quality/work"), metavar="DIR", help="scratch space")
    p.add_argument("--budgets", nargs="+", type=float, metavar="R", help="storage budgets (default: 0.1 0.25 0.5)")
    p.set_defaults(run=_calibration)


def _quality(args) -> int:
    from benchmarks.quality.score import run_suites
    from benchmarks.quality.suites import SUITES
    from rmm.errors import RMMError

    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise RMMError(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    run_suites(args.suites or list(SUITES), args.work, methods=args.methods, ratios=args.ratios)
    return 0


def _calibration(args) -> int:
    from benchmarks.quality.calibration import BUDGETS, run_calibration
    from benchmarks.quality.suites import SUITES
    from rmm.errors import RMMError

    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise RMMError(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    run_calibration(args.suites or ["few"], args.work, args.budgets or BUDGETS)
    return 0
