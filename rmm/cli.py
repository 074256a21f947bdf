"""The `rmm` command: merge, revert, inspect, extract."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from rmm import __version__
from rmm.adapter import module_name
from rmm.bundle import MergeOptions
from rmm.device import DEVICES
from rmm.errors import RMMError
from rmm.summary import inspect_bundle

console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except RMMError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmm", description="Reversible Model Merging of LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"rmm {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("merge", help="merge PEFT LoRA adapters into a basis bundle")
    p.add_argument(
        "adapters",
        nargs="+",
        type=Path,
        metavar="ADAPTER_DIR",
        help="PEFT LoRA directories; task name = directory name",
    )
    p.add_argument("--out", required=True, type=Path, metavar="BUNDLE")
    p.add_argument(
        "--method",
        choices=["auto", "rmm-paper"],
        help="auto (default): per module, per-task rank truncation, joint "
        "or per-position sharing, whichever removes the most error under one storage budget; "
        "rmm-paper: the paper's per-position basis (implied by --basis-size / --canonicalize)",
    )
    add_budget_args(p)
    add_calibration_args(p)
    add_device_arg(p)
    p.add_argument("--force", action="store_true", help="replace BUNDLE if it exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(run=_merge)

    p = verbs.add_parser("revert", help="rebuild tasks' adapters from a bundle as PEFT directories")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="writes DIR/<task>/")
    p.add_argument("--task", action="append", metavar="NAME", help="task to revert (repeatable; default all)")
    p.add_argument(
        "--force", action="store_true", help="replace DIR/<task> if it exists (nothing else in DIR is touched)"
    )
    add_device_arg(p)
    p.set_defaults(run=_revert)

    p = verbs.add_parser("inspect", help="tasks, p, storage and reconstruction error of a bundle")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--json", action="store_true", help="print as JSON on stdout")
    p.set_defaults(run=_inspect)

    p = verbs.add_parser("extract", help="turn a fully fine-tuned checkpoint into a LoRA adapter (PT-SVD)")
    p.add_argument("--base", required=True, type=Path, metavar="BASE_DIR")
    p.add_argument("--finetuned", required=True, type=Path, metavar="FT_DIR")
    p.add_argument("--rank", required=True, type=int, metavar="R")
    p.add_argument("--out", required=True, type=Path, metavar="ADAPTER_DIR")
    p.add_argument(
        "--target-modules", nargs="+", metavar="NAME", help="module names or suffixes (default: every changed Linear)"
    )
    p.add_argument("--json", action="store_true", help="print the per-module summary as JSON on stdout")
    add_device_arg(p)
    p.set_defaults(run=_extract)

    p = verbs.add_parser(
        "baseline", help="run a registered merging baseline (TA, TIES, DARE, Core Space, LoRE, truncation, ...)"
    )
    p.add_argument("method", nargs="?", metavar="METHOD", help="a registered method; omit with --list")
    p.add_argument("adapters", nargs="*", type=Path, metavar="ADAPTER_DIR")
    p.add_argument("--out", type=Path, metavar="DIR")
    p.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter (JSON value), repeatable"
    )
    p.add_argument("--list", action="store_true", help="list the methods and their parameters")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(run=_baseline)

    # Other packages add verbs (the federation's coordinator and sites) without rmm importing them.
    for entry in sorted(entry_points(group="rmm.commands"), key=lambda e: e.name):
        entry.load()(verbs)
    return parser


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """--basis-size / --storage-ratio / --canonicalize, shared by every verb that builds a basis."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--basis-size", type=int, metavar="P", help="basis size p per position (rmm-paper)")
    budget.add_argument(
        "--storage-ratio",
        type=float,
        metavar="R",
        help="store at most R x the numbers of the original LoRAs (default 0.5); "
        "an R that keeps nothing is refused, naming the smallest sure to keep something "
        "(about 1 / (T r): one direction shared by all T tasks of rank r in one module)",
    )
    p.add_argument("--canonicalize", action="store_true", help="canonicalise each adapter's factors (SVD of B A) first")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where to compute: auto (default: a CUDA GPU when torch sees one, else the CPU), cpu or cuda; "
        "float64 on both, the same result",
    )


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """--base / --calibration / --calibration-examples: choose method auto's plan by the tasks' outputs."""
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="choose the plan that changes each task's outputs the least (KL divergence) on its examples in "
        'DIR/<task>.jsonl (or DIR/default.jsonl), one per line as {"input_ids": [...]} or {"text": ...}; '
        "needs --base",
    )
    p.add_argument("--base", type=Path, metavar="BASE_DIR", help="the base model (a transformers directory)")
    p.add_argument(
        "--calibration-examples",
        type=int,
        default=64,
        metavar="N",
        help="examples per task, the first N of its file (default 64)",
    )


def calibration_of(args):
    """The Calibration of a verb's flags, or None without --calibration."""
    from rmm.calibrate import Calibration

    if (args.calibration is None) != (args.base is None):
        raise RMMError("--calibration and --base go together: the examples and the base model they run on")
    return None if args.calibration is None else Calibration(args.base, args.calibration, args.calibration_examples)


def merge_options(args) -> MergeOptions:
    """The MergeOptions of a verb's flags, the one way every verb (merge, simulate, site run) reads them:
    a flag the verb lacks or was not given keeps MergeOptions' default and its rule of what implies what."""
    given = {name: getattr(args, name) for name in MergeOptions.model_fields if getattr(args, name, None) is not None}
    try:
        return MergeOptions(**given)
    except ValidationError as e:
        raise RMMError(f"invalid options: {e.errors()[0]['msg']}") from None


def _merge(args) -> int:
    from rmm.merge import merge

    manifest = merge(
        args.adapters,
        args.out,
        merge_options(args),
        calibration=calibration_of(args),
        device=args.device,
        progress=not args.json,
        force=args.force,
    )
    summary = inspect_bundle(args.out, manifest)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


def _revert(args) -> int:
    from rmm.merge import revert

    written = revert(args.bundle, args.out, args.task, device=args.device, force=args.force)
    console.print(f"reverted {len(written)} task(s) into {args.out}: {', '.join(written)}", highlight=False)
    return 0


def _inspect(args) -> int:
    summary = inspect_bundle(args.bundle)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    _print_summary(summary)
    tasks = Table(title="reconstruction error of dW per task (relative Frobenius)")
    for col in ("task", "mean", "max", "worst module"):
        tasks.add_column(col)
    for name, row in summary["tasks"].items():
        tasks.add_row(name, f"{row['mean_error']:.2e}", f"{row['max_error']:.2e}", module_name(row["worst_module"]))
    console.print(tasks)
    modules = Table(title="per module")
    for col in ("module", "shape", "rank", "stored as", "energy kept", "max error"):
        modules.add_column(col)
    for name, row in summary["modules"].items():
        energy = " ".join(f"{k} {v:.4f}" for k, v in row["energy"].items())
        modules.add_row(
            module_name(name),
            row["shape"],
            str(row["rank"]),
            row["stored"],
            energy,
            "-" if row["max_error"] is None else f"{row['max_error']:.2e}",
        )
    console.print(modules)
    return 0


def _baseline(args) -> int:
    from rmm.baselines import METHODS, run

    if args.list:
        table = Table(title="registered methods")
        for col in ("method", "kind", "parameters", "description"):
            table.add_column(col)
        for name, m in METHODS.items():
            table.add_row(name, m.kind, ", ".join(f"{k}={v}" for k, v in m.params.items()), m.description)
        console.print(table)
        return 0
    if not args.method or not args.adapters or not args.out:
        raise RMMError("give METHOD, ADAPTER_DIR... and --out DIR (or --list)")
    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            raise RMMError(f"--param {item!r}: expected NAME=VALUE")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    summary = run(args.method, args.adapters, args.out, force=args.force, **params)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        console.print(
            f"{args.method}: storage {summary['storage_ratio']:.4f} of the originals, wrote {args.out}", highlight=False
        )
    return 0


def _extract(args) -> int:
    from rmm.extract import extract

    summary = extract(
        args.base, args.finetuned, args.rank, args.out, args.target_modules, progress=not args.json, device=args.device
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(f"wrote {args.out}")
    return 0


def _print_summary(summary: dict) -> None:
    s = summary["storage"]
    errors = [t["mean_error"] for t in summary["tasks"].values()]
    measured = (
        f"mean {sum(errors) / len(errors):.2e}, max {max(t['max_error'] for t in summary['tasks'].values()):.2e}"
        if errors
        else "not measured here (only the sites that hold the original adapters can)"
    )
    console.print(
        f"[bold]{summary['bundle']}[/]: {summary['tasks_count']} tasks, {summary['modules_count']} modules, method "
        f"{summary['options']['method']}: "
        + ", ".join(f"{n} {kind}" for kind, n in summary["allocation"].items() if n)
        + (f" (p = {summary['p']})" if summary["p"] != [] else "")
        + "\n"
        f"storage: {s['ratio_counted']:.4f} of the originals (formula {s['ratio_formula']:.4f}; "
        f"{s['bytes_on_disk']:,} bytes on disk, {s['ratio_bytes_on_disk']:.4f} of {s['bytes_original']:,}; "
        f"{s['dtype']})\n"
        f"relative dW error: {measured}",
        highlight=False,
    )
    if summary["calibration"]:
        c = summary["calibration"]
        console.print(
            f"calibration ({c['examples']} examples per task, {c['seconds']['total']:.1f} s) chose "
            f"[bold]{c['chosen']}[/] of: "
            + ", ".join(f"{name} {x['storage_ratio']:.3f} KL {x['total']:.3g}" for name, x in c["candidates"].items()),
            highlight=False,
        )
    if s["ratio_counted"] >= 1:
        console.print(
            "[yellow]warning:[/] the bundle stores more numbers than the adapters it replaces; "
            "use a smaller --basis-size or a --storage-ratio below 1",
            highlight=False,
        )


if __name__ == "__main__":
    sys.exit(main())
