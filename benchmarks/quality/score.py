"""Score every merging method on a quality suite: accuracy per task, retained gain, storage.

For each adapter a of the suite (trained for task t): `orig` = its accuracy on t, `base` = the base
model's (encoder suites: a's own head with the LoRA off), `cand` = the candidate's (a reverted adapter,
or the one merged adapter of a single-model method). normalized = cand / orig; retained gain =
(cand - base) / (orig - base). Storage = numbers the method stores over the LoRA numbers of the T
originals (heads excluded), counted from what the method wrote, at the originals' precision.

    rmm bench quality few many hetero pt-svd          # tables + JSON + plots in benchmarks/results/,
                                                      # and the summary table in the README

Scores are cached per (suite, method, parameters, tool version) next to the suite, so a re-run only
scores what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from benchmarks.quality.suites import CALIBRATION_N, SUITES, Suite, baseline, build_suite, calibration_dir, evaluate
from rmm import __version__
from rmm.baselines import METHODS, SINGLE_DIR, run
from rmm.bundle import read_manifest
from rmm.errors import RMMError

RATIOS = (0.1, 0.25, 0.375, 0.5)
CALIBRATED = "auto-calibrated"  # the default given the base and each adapter's calibration data (--calibration)
REVERSIBLE = ("auto", CALIBRATED, "truncate", "joint", "rmm-paper", "rmm-canonical", "share")
SINGLE = (
    "ta-factors",
    "ties-factors",
    "dare-factors",
    "ta-dw",
    "ties-dw",
    "dare-dw",
    "core-space-ta",
    "core-space-ties",
    "lore",
)
RESULTS = Path(__file__).resolve().parents[1] / "results"
README = Path(__file__).resolve().parents[2] / "README.md"


def candidates() -> list[tuple[str, dict]]:
    """Every (method, params) the table compares: reversible methods at each storage ratio."""
    calibrated = {"calibration_examples": CALIBRATION_N}
    return (
        [(m, {"storage_ratio": r} | (calibrated if m == CALIBRATED else {})) for m in REVERSIBLE for r in RATIOS]
        + [(m, {}) for m in SINGLE]
        + [("peft-svd", {})]
    )


def score(suite: Suite, method: str, params: dict, work: Path, compute: bool = True) -> dict | None:
    """One candidate's per-adapter accuracy and storage (cached next to the suite; None if not and not `compute`)."""
    key = hashlib.sha256(json.dumps([method, params, __version__], sort_keys=True).encode()).hexdigest()[:12]
    cache = _scores_dir(suite) / f"{method}-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if not compute:
        return None
    out = work / suite.name / f"{method}-{key}"
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted run left
    clock = time.perf_counter()
    dirs = list(suite.adapters.values())
    if method == "peft-svd":
        summary = _peft_svd(suite, out)
    elif method == CALIBRATED:  # the data paths are the suite's, so they stay out of the cache key
        data = {"base": str(suite.base_dir / "model"), "calibration": str(calibration_dir(suite))}
        summary = run("auto", dirs, out, force=True, **params, **data)
    else:
        summary = run(method, dirs, out, force=True, **params)
    seconds = time.perf_counter() - clock
    single = method == "peft-svd" or (method in METHODS and METHODS[method].kind == "single")
    # A single merged adapter has no head of each task: each task is scored with its own (encoder suites).
    acc = {
        a: evaluate(suite, out / SINGLE_DIR, suite.task_of[a], head=d)
        if single
        else evaluate(suite, out / a, suite.task_of[a])
        for a, d in suite.adapters.items()
    }
    result = {
        "method": method,
        "params": params,
        "kind": "single" if single else "reversible",
        "storage_ratio": summary["storage_ratio"],
        "accuracy": acc,
        "seconds": seconds,
        "score_seconds": time.perf_counter() - clock,
    }
    if method == CALIBRATED:  # what calibration weighed and chose, for benchmarks/quality/calibration.py's tables
        result["calibration"] = read_manifest(summary["bundle"]).report.calibration.model_dump(
            include={"candidates", "chosen", "seconds"}
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    return result


def references(suite: Suite) -> tuple[dict[str, float], dict[str, float]]:
    """Each adapter's own accuracy and its baseline's (what a gain is counted between), cached next to the suite."""
    cache = _scores_dir(suite) / f"references-{__version__}.json"
    if cache.is_file():
        found = json.loads(cache.read_text())
        return found["orig"], found["base"]
    orig = {a: evaluate(suite, d, suite.task_of[a]) for a, d in suite.adapters.items()}
    base = {a: baseline(suite, a) for a in suite.adapters}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"orig": orig, "base": base}, indent=2))
    return orig, base


def retained_gain(suite: Suite, accuracy: dict[str, float]) -> float:
    """(candidate - base) / (original - base), averaged over the suite's adapters."""
    orig, base = references(suite)
    return sum((accuracy[a] - base[a]) / (orig[a] - base[a]) for a in suite.adapters) / len(suite.adapters)


def table(suite: Suite, results: list[dict]) -> dict:
    """Averages per candidate against the originals and the base."""
    orig, base = references(suite)
    rows = []
    for r in results:
        rows.append(
            {
                **{k: r[k] for k in ("method", "params", "kind", "storage_ratio")},
                "retained_gain": retained_gain(suite, r["accuracy"]),
                "min_normalized": min(r["accuracy"][a] / orig[a] for a in suite.adapters),
                "mean_accuracy": sum(r["accuracy"].values()) / len(suite.adapters),
            }
        )
    return {
        "suite": suite.name,
        "adapters": len(suite.adapters),
        "orig_mean": sum(orig.values()) / len(orig),
        "base_mean": sum(base.values()) / len(orig),
        "rows": rows,
    }


def write(report: dict, command: str) -> Path:
    """Markdown + JSON + PNG (retained gain against storage) under benchmarks/results/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"quality_{report['suite']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"`{command}`",
        "",
        f"suite **{report['suite']}**: {report['adapters']} adapters; mean accuracy of the originals "
        f"{report['orig_mean']:.3f}, of the baseline (base alone; encoder suites: heads with the LoRA off) "
        f"{report['base_mean']:.3f}",
        "",
        "| method | params | storage | retained gain | min normalized acc | mean acc |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(report["rows"], key=lambda r: (r["kind"], r["method"], r["storage_ratio"])):
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(
            f"| {r['method']} | {params} | {r['storage_ratio']:.3f} | {r['retained_gain']:.3f} | "
            f"{r['min_normalized']:.3f} | {r['mean_accuracy']:.3f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in REVERSIBLE:
        pts = sorted((r["storage_ratio"], r["retained_gain"]) for r in report["rows"] if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    singles = [r for r in report["rows"] if r["kind"] == "single"]
    for r, marker in zip(singles, "xPD^v<>sp*h"):  # one merged model each: points, told apart by marker
        ax.scatter(r["storage_ratio"], r["retained_gain"], marker=marker, label=f"{r['method']} (single)")
    ax.set_xlabel("storage (numbers stored / numbers of the T original LoRAs)")
    ax.set_ylabel("average retained gain")
    ax.set_title(f"suite {report['suite']}: {report['adapters']} adapters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return stem


def _scores_dir(suite: Suite) -> Path:
    return suite.root / "scores"


def _peft_svd(suite: Suite, out: Path) -> dict:
    """PEFT's own `add_weighted_adapter(combination_type="svd")`, weights 1/T: a third-party reference."""
    from peft import PeftModel

    from benchmarks.quality.encoder import without_head
    from benchmarks.quality.suites import load
    from rmm.baselines import lora_numbers

    names, dirs = list(suite.adapters), dict(suite.adapters)
    if suite.spec.get("kind") == "encoder":  # PEFT refuses adapters that each save a head: merge their LoRA only
        dirs = {n: without_head(d, out / "lora-only" / n) for n, d in dirs.items()}
    model = PeftModel.from_pretrained(load(suite), dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(dirs[n], adapter_name=n)
    r = max(model.peft_config[n].r for n in names)  # mixed ranks: the largest, as the other dW methods keep
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "merged", combination_type="svd", svd_rank=r)
    model.save_pretrained(out, selected_adapters=["merged"])
    merged = out / "merged"
    original = sum(lora_numbers(d) for d in suite.adapters.values())
    return {"storage_ratio": lora_numbers(merged) / original}


def run_suites(
    names: list[str], work: Path, readme: Path | None = README, methods: list[str] | None = None, ratios=None
) -> None:
    """Build (or load) each suite, score every candidate (only those of `methods` at `ratios`, if given: the others are
    reported if cached), write its results; then the README summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    for name in names:
        suite = build_suite(name)
        results = []
        for m, p in candidates():
            wanted = (not methods or m in methods) and (not ratios or p.get("storage_ratio", ratios[0]) in ratios)
            try:
                found = score(suite, m, p, work, compute=wanted)
            except RMMError as e:  # e.g. a storage ratio below what a method can reach: say so, go on
                print(f"{name}: {m} {p}: skipped: {e}")
            else:
                results += [found] if found else []
        stem = write(table(suite, results), f"rmm bench quality {name}")
        print(stem.with_suffix(".md").read_text())
    if readme is not None and readme.is_file():
        text = readme.read_text()
        updated = with_summary(text, summary())
        if updated != text:
            readme.write_text(updated)
            print(f"updated the quality summary in {readme}")


def summary() -> str:
    """Markdown: average retained gain (storage) of the reversible methods and the best single merge,
    per suite and storage ratio, from benchmarks/results/quality_*.json; the best of each row in bold. A method
    or budget that no results file has yet (added since the suites were last scored) is left out."""
    reports = {
        s: json.loads((RESULTS / f"quality_{s}.json").read_text())
        for s in SUITES
        if (RESULTS / f"quality_{s}.json").is_file()
    }
    columns = [m for m in REVERSIBLE if any(_at(r, m, ratio) for r in reports.values() for ratio in RATIOS)]
    methods = [f"{m} (default)" if m == "auto" else m for m in columns] + ["best single merge"]
    lines = ["| suite | budget | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for suite, report in reports.items():
        for ratio in RATIOS:
            cells = [_at(report, m, ratio) for m in columns]
            if not any(cells):
                continue
            cells.append(_best_single(report))
            top = max(c[0] for c in cells if c is not None)
            shown = [
                "-" if c is None else (f"**{c[0]:.3f}** ({c[1]:.2f})" if c[0] == top else f"{c[0]:.3f} ({c[1]:.2f})")
                for c in cells
            ]
            lines.append(f"| {suite} | {ratio} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def _at(report: dict, method: str, ratio: float) -> tuple[float, float] | None:
    rows = [r for r in report["rows"] if r["method"] == method and r["params"].get("storage_ratio") == ratio]
    return (rows[0]["retained_gain"], rows[0]["storage_ratio"]) if rows else None


def _best_single(report: dict) -> tuple[float, float] | None:
    rows = [r for r in report["rows"] if r["kind"] == "single"]
    top = max(rows, key=lambda r: r["retained_gain"], default=None)
    return (top["retained_gain"], top["storage_ratio"]) if top else None


START, END = "<!-- quality summary: rmm bench quality -->", "<!-- end of quality summary -->"


def with_summary(text: str, table: str, markers: tuple[str, str] = (START, END)) -> str:
    """`text` with the block between `markers` (the README's quality summary's by default) replaced by `table`."""
    start, end = markers
    if start not in text or end not in text:
        return text
    before, rest = text.split(start, 1)
    return before + start + "\n" + table + rest[rest.index(end) :]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="score every method on quality suites")
    parser.add_argument("suites", nargs="*", default=["few"], choices=SUITES)
    parser.add_argument("--work", type=Path, default=Path(".cache/quality/work"))
    parser.add_argument("--methods", nargs="+", help="score only these methods (others are listed if cached)")
    parser.add_argument("--ratios", nargs="+", type=float, help="score reversible methods only at these budgets")
    args = parser.parse_args(argv)
    run_suites(args.suites, args.work, methods=args.methods, ratios=args.ratios)


if __name__ == "__main__":
    main()
