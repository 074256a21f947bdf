"""`make demo`: train (or load) the example adapters, merge them centrally at a few budgets, run the
same merge as a federation of 3 sites (`rmm simulate`), revert everything and compare accuracy.

Every merge, revert and simulation goes through the `rmm` command itself, printed before it runs.
The numbers are the same on every run and every x86-64 machine: the demo runs on the kernels the
example adapters are trained on (`rmm.examples.PORTABLE_KERNELS`), and everything in it is seeded.
It writes them to benchmarks/results/demo.json and demo.md, and the table into the README between its
markers (tests/test_claims.py checks that the README's table is the one demo.json gives).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console

from benchmarks.quality.score import with_summary
from rmm.cli import main as rmm
from rmm.adapter import delta_weight, open_adapter
from rmm.examples import PORTABLE_KERNELS, build_examples, evaluate
from rmm.summary import inspect_bundle

console = Console()
ROOT = Path(__file__).resolve().parents[1]
RESULTS, README = ROOT / "benchmarks" / "results", ROOT / "README.md"
MARKERS = ("<!-- demo table: make demo -->", "<!-- end of demo table -->")

# (column label, extra `rmm merge` arguments): the default method (auto) and the paper's RMM (c: canonicalised)
SETTINGS = [
    ("auto .25", ["--storage-ratio", "0.25"]),
    ("auto .5", ["--storage-ratio", "0.5"]),
    ("paper .5", ["--method", "rmm-paper", "--storage-ratio", "0.5"]),
    ("paper .75 c", ["--storage-ratio", "0.75", "--canonicalize"]),
]
FEDERATED = ("fed .5", ["--storage-ratio", "0.5"])  # the default merge of "auto .5", by 3 sites over gRPC
SITES = 3


def run(out: Path, results_dir: Path = RESULTS, readme: Path | None = README) -> dict:
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
    console.print(
        f"[dim]$ rmm simulate --sites {SITES} --adapters $A/* --out {fed} --force {shlex.join(extra)}[/]",
        highlight=False,
    )
    _rmm(
        [
            "simulate",
            "--sites",
            str(SITES),
            "--adapters",
            *map(str, examples.adapters.values()),
            "--out",
            str(fed),
            "--force",
            *extra,
        ]
    )
    report = json.loads((fed / "report.json").read_text())
    where = {t: Path(s["reverted"]) / t for s in report["sites"] for t in s["tasks"]}
    results[label] = {t: evaluate(examples.base_dir, where[t], t) for t in tasks}
    same = max(_relative_difference(where[t], out / _slug("auto .5") / "reverted" / t) for t in tasks)
    summaries[label] = {**summaries["auto .5"]}  # same budget, same plan: storage and allocation are the central run's

    record = {  # what the table shows, and nothing that changes from run to run (no times, no paths)
        "tasks": tasks,
        "accuracy": results,
        "merges": {
            k: {"storage": s["storage"]["ratio_counted"], "stored_as": _stored_as(s), "mean_dW_error": _mean_error(s)}
            for k, s in summaries.items()
        },
        "federated_vs_centralised_max_relative_dW_difference": same,
        "federation": {
            s["site"]: {k: s[k] for k in ("tasks", "bytes_up", "bytes_down", "lora_bytes")} for s in report["sites"]
        },
    }
    table = render(record)
    console.print(table, highlight=False, markup=False, soft_wrap=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    (results_dir / "demo.md").write_text(table)
    console.print(f"results: {results_dir / 'demo.json'}, {results_dir / 'demo.md'}")
    if readme is not None and readme.is_file():
        text = readme.read_text()
        if (updated := with_summary(text, table, MARKERS)) != text:
            readme.write_text(updated)
            console.print(f"updated the demo table in {readme}")
    return record


def render(record: dict) -> str:
    """The demo's table in markdown (the README's): accuracy per task and column, then what each merge stored."""
    acc, merges = record["accuracy"], record["merges"]
    lines = ["| task | " + " | ".join(acc) + " |", "|---|" + "---:|" * len(acc)]
    lines += [f"| {t} | " + " | ".join(f"{acc[c][t]:.3f}" for c in acc) + " |" for t in record["tasks"]]
    lines.append("| **mean** | " + " | ".join(f"{sum(a.values()) / len(a):.3f}" for a in acc.values()) + " |")
    lines.append("| storage (counted) | | 1 | " + " | ".join(f"{m['storage']:.3f}" for m in merges.values()) + " |")
    lines.append("| stored as | | | " + " | ".join(m["stored_as"] for m in merges.values()) + " |")
    lines.append(
        "| mean rel. dW error | | 0 | " + " | ".join(f"{m['mean_dW_error']:.3f}" for m in merges.values()) + " |"
    )
    same = record["federated_vs_centralised_max_relative_dW_difference"]
    return (
        "\n".join(lines)
        + f"\n\nLargest relative dW difference between the federated and the centralised adapters: {same:.1e}.\n"
    )


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
    return " ".join(f"{n}{kind[0]}" for kind, n in a.items() if n)


def _slug(label: str) -> str:
    return label.replace(" ", "-").replace(".", "")


if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in PORTABLE_KERNELS.items()):  # torch picks its kernels when it starts
        os.execve(sys.executable, [sys.executable, "-m", "workers.demo", *sys.argv[1:]], os.environ | PORTABLE_KERNELS)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    run(parser.parse_args().out)
