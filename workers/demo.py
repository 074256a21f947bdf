"""`make demo`: train (or load) the example adapters, merge them centrally at a few budgets, run the
same merge as a federation of 3 sites (`rmm simulate`), revert everything and compare accuracy.

Every merge, revert and simulation goes through the `rmm` command itself, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rmm.cli import main as rmm
from rmm.adapter import delta_weight, open_adapter
from rmm.examples import build_examples, evaluate
from rmm.summary import inspect_bundle

console = Console()

# (column label, extra `rmm merge` arguments): the default method (auto) and the paper's RMM (c: canonicalised)
SETTINGS = [
    ("auto .25", ["--storage-ratio", "0.25"]),
    ("auto .5", ["--storage-ratio", "0.5"]),
    ("paper .5", ["--method", "rmm-paper", "--storage-ratio", "0.5"]),
    ("paper .75 c", ["--storage-ratio", "0.75", "--canonicalize"]),
]
FEDERATED = ("fed .5", ["--storage-ratio", "0.5"])  # the default merge of "auto .5", by 3 sites over gRPC
SITES = 3


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
        _rmm(["revert", str(bundle), "--out", str(reverted), "--force"])
        summaries[label] = inspect_bundle(bundle)
        results[label] = {t: evaluate(examples.base_dir, reverted / t, t) for t in tasks}

    label, extra = FEDERATED
    fed = out / "federated"
    console.print(f"[dim]$ rmm simulate --sites {SITES} --adapters $A/* --out {fed} --force {shlex.join(extra)}[/]", highlight=False)
    _rmm(["simulate", "--sites", str(SITES), "--adapters", *map(str, examples.adapters.values()), "--out", str(fed), "--force", *extra])
    report = json.loads((fed / "report.json").read_text())
    where = {t: Path(s["reverted"]) / t for s in report["sites"] for t in s["tasks"]}
    results[label] = {t: evaluate(examples.base_dir, where[t], t) for t in tasks}
    same = max(_relative_difference(where[t], out / _slug("auto .5") / "reverted" / t) for t in tasks)
    summaries[label] = {**summaries["auto .5"]}  # same budget, same plan: storage and allocation are the central run's
    console.print(f"federated vs centralised 'auto .5': largest relative dW difference over all tasks and modules {same:.1e}", highlight=False)

    table = Table(
        title=f"held-out accuracy: {len(tasks)} tasks, original adapters vs reverted from bundles",
        caption=f"columns: method and --storage-ratio (c: --canonicalize); fed: 'auto .5' by {SITES} sites over gRPC; "
        "LoRA off: the task's head without its LoRA; stored as: modules truncated (t) / shared jointly (j) / "
        "per position (s), or basis size p",
    )
    table.add_column("task", no_wrap=True)
    for column in results:
        table.add_column(column, justify="right")
    for t in tasks:
        table.add_row(t, *(f"{results[c][t]:.3f}" for c in results))
    table.add_section()
    table.add_row("mean", *(f"{sum(r.values()) / len(r):.3f}" for r in results.values()))
    table.add_row("storage", "", "1", *(f"{s['storage']['ratio_counted']:.3f}" for s in summaries.values()))
    table.add_row("stored as", "", "", *(_stored_as(s) for s in summaries.values()))
    table.add_row("dW error", "", "0", *(f"{_mean_error(s):.3f}" for s in summaries.values()))
    console.print(table)
    record = {
        "accuracy": results,
        "storage": {k: s["storage"] for k, s in summaries.items()},
        "allocation": {k: s["allocation"] for k, s in summaries.items()},
        "federated_vs_centralised_max_relative_dW_difference": same,
        "federation": {s["site"]: {k: s[k] for k in ("tasks", "bytes_up", "bytes_down", "lora_bytes", "seconds")} for s in report["sites"]},
    }
    (out / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"results: {out / 'demo.json'}")
    return record


def _rmm(argv: list[str]) -> None:
    if argv[0] not in ("merge", "simulate"):  # printed by the caller, with the adapter paths shortened
        console.print(f"[dim]$ rmm {shlex.join(argv)}[/]", highlight=False)
    if rmm(argv) != 0:
        raise SystemExit(f"rmm {argv[0]} failed")


def _relative_difference(a: Path, b: Path) -> float:
    """Largest ||dW_a - dW_b|| / ||dW_b|| over the modules of two adapters."""
    x, y = open_adapter(a), open_adapter(b)
    worst = 0.0
    for m in y.modules:
        dx, dy = delta_weight(*x.load_factors(m)), delta_weight(*y.load_factors(m))
        worst = max(worst, ((dx - dy).norm() / dy.norm()).item())
    return worst


def _mean_error(summary: dict) -> float:
    return sum(t["mean_error"] for t in summary["tasks"].values()) / len(summary["tasks"])


def _stored_as(summary: dict) -> str:
    a = summary["allocation"]
    if summary["options"]["method"] == "rmm-paper":
        return f"p={summary['p']}"
    return f"{a['truncate']}t {a['joint']}j" + (f" {a['shared']}s" if a["shared"] else "")


def _slug(label: str) -> str:
    return label.replace(" ", "-").replace(".", "")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    run(parser.parse_args().out)
