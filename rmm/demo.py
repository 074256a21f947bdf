"""`make demo`: train (or load) the example adapters, merge them at a few budgets, revert, compare.

Every merge and revert goes through the `rmm` command itself, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rmm.cli import main as rmm
from rmm.examples import build_examples, evaluate
from rmm.summary import inspect_bundle

console = Console()

# (column label, extra `rmm merge` arguments); "c" = --canonicalize
SETTINGS = [
    ("0.5", ["--storage-ratio", "0.5"]),
    ("0.5 c", ["--storage-ratio", "0.5", "--canonicalize"]),
    ("0.75", ["--storage-ratio", "0.75"]),
    ("0.75 c", ["--storage-ratio", "0.75", "--canonicalize"]),
    ("full p", ["--basis-size", "64"]),
]


def run(out: Path) -> dict:
    examples = build_examples()
    tasks = list(examples.adapters)
    results = {
        "LoRA off": {t: evaluate(examples.base_dir, examples.adapters[t], t, head_only=True) for t in tasks},
        "orig": {t: evaluate(examples.base_dir, examples.adapters[t], t) for t in tasks},
    }
    summaries = {}
    adapters_dir = examples.adapters[tasks[0]].parent
    console.print(f"A={adapters_dir}", highlight=False, soft_wrap=True)
    for label, extra in SETTINGS:
        bundle, reverted = out / _slug(label) / "bundle", out / _slug(label) / "reverted"
        console.print(f"[dim]$ rmm merge $A/* --out {bundle} --force {shlex.join(extra)}[/]", highlight=False)
        _rmm(["merge", *map(str, examples.adapters.values()), "--out", str(bundle), "--force", *extra])
        _rmm(["revert", str(bundle), "--out", str(reverted)])
        summaries[label] = inspect_bundle(bundle)
        results[label] = {t: evaluate(examples.base_dir, reverted / t, t) for t in tasks}

    table = Table(
        title=f"held-out accuracy: {len(tasks)} tasks, original adapters vs reverted from bundles",
        caption="columns: --storage-ratio R (c: --canonicalize); LoRA off = the task's head without its LoRA",
    )
    table.add_column("task", no_wrap=True)
    for column in results:
        table.add_column(column, justify="right")
    for t in tasks:
        table.add_row(t, *(f"{results[c][t]:.3f}" for c in results))
    table.add_section()
    table.add_row("mean", *(f"{sum(r.values()) / len(r):.3f}" for r in results.values()))
    table.add_row("storage", "", "1", *(f"{s['storage']['ratio_counted']:.3f}" for s in summaries.values()))
    table.add_row("p", "", "", *(str(s["p"]) for s in summaries.values()))
    table.add_row("dW error", "", "0", *(f"{_mean_error(s):.3f}" for s in summaries.values()))
    console.print(table)
    record = {"accuracy": results, "storage": {k: s["storage"] for k, s in summaries.items()}, "p": {k: s["p"] for k, s in summaries.items()}}
    (out / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"results: {out / 'demo.json'}")
    return record


def _rmm(argv: list[str]) -> None:
    if argv[0] != "merge":  # merge is printed by the caller, with the adapter paths shortened
        console.print(f"[dim]$ rmm {shlex.join(argv)}[/]", highlight=False)
    if rmm(argv) != 0:
        raise SystemExit(f"rmm {argv[0]} failed")


def _mean_error(summary: dict) -> float:
    return sum(t["mean_error"] for t in summary["tasks"].values()) / len(summary["tasks"])


def _slug(label: str) -> str:
    return label.replace(" ", "-").replace(".", "")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    run(parser.parse_args().out)
