"""What the README claims about exactness and budgets, checked on real PEFT adapters against dW computed
here from the adapter files alone (config + safetensors, no rmm code)."""

import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import load_base, make_adapter
from rmm.bundle import MergeOptions
from rmm.merge import merge, revert

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def deltas(adapter_dir) -> dict[str, torch.Tensor]:
    """dW = s B A per module in float64, s = alpha / r (or / sqrt(r)), as PEFT defines it for these configs."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    r, alpha = config["r"], config["lora_alpha"]
    s = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    w = load_file(adapter_dir / "adapter_model.safetensors")
    return {
        k[: -len(".lora_A.weight")]: s * w[k.replace("lora_A", "lora_B")].double() @ w[k].double()
        for k in w
        if k.endswith(".lora_A.weight")
    }


def worst_error(originals, reverted_root) -> float:
    worst = 0.0
    for a in originals:
        want, got = deltas(a), deltas(reverted_root / a.name)
        assert want.keys() == got.keys()
        worst = max(worst, *(((got[m] - want[m]).norm() / want[m].norm()).item() for m in want))
    return worst


def in_dtype(base, adapter_dir, out, dtype):
    """The adapter as PEFT saves it after `.to(dtype)`."""
    PeftModel.from_pretrained(load_base(base), adapter_dir).to(dtype).save_pretrained(out)
    assert {v.dtype for v in load_file(out / "adapter_model.safetensors").values()} == {dtype}
    return out


# Mixed ranks and scaling rules whose scaling is a power of two: alpha / r = 2, 2, 1 and rslora 4 / sqrt(4) = 2.
RULES = [
    dict(r=4, lora_alpha=8),
    dict(r=2, lora_alpha=4),
    dict(r=4, lora_alpha=4),
    dict(r=4, lora_alpha=4, use_rslora=True),
]


@pytest.mark.parametrize("name", DTYPES)
def test_default_at_full_storage_reverts_exactly_in_every_dtype(llama_base, tmp_path, name):
    """README: at --storage-ratio 1 every task comes back with exactly its dW (scaling a power of two)."""
    paths = [
        in_dtype(
            llama_base,
            make_adapter(llama_base, tmp_path / "src" / f"t{i}", seed=i, **rule),
            tmp_path / name / f"t{i}",
            DTYPES[name],
        )
        for i, rule in enumerate(RULES)
    ]
    manifest = merge(paths, tmp_path / "bundle", MergeOptions(storage_ratio=1.0), progress=False)
    assert manifest.storage_dtype == str(DTYPES[name]).removeprefix("torch.")
    assert manifest.report.storage.bytes_stored <= manifest.report.storage.bytes_original
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    assert worst_error(paths, tmp_path / "rev") == 0.0
    assert max(e for t in manifest.report.errors.values() for e in t.values()) < 1e-7  # Gram products resolve ~1e-8


# Unit roundoff of each dtype: one rounding moves a number by at most this share of it.
ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}


@pytest.mark.parametrize("name", DTYPES)
def test_other_scalings_and_the_papers_full_basis_revert_within_rounding(llama_base, tmp_path, name):
    """README: with a scaling that is not a power of two the default is off by one rounding of s A (below u,
    the dtype's unit roundoff); the paper's RMM at p = T - 1 rebuilds each factor from a mean and a basis
    stored in the dtype (below 4 u)."""
    u = ROUNDOFF[name]
    odd = [
        in_dtype(
            llama_base,
            make_adapter(llama_base, tmp_path / "src" / f"o{i}", seed=i, r=4, lora_alpha=6),
            tmp_path / name / f"o{i}",
            DTYPES[name],
        )
        for i in range(4)
    ]  # s = 1.5
    merge(odd, tmp_path / "auto", MergeOptions(storage_ratio=1.0), progress=False)
    revert(tmp_path / "auto", tmp_path / "rev-auto", progress=False)
    assert 0 < worst_error(odd, tmp_path / "rev-auto") < u
    merge(odd, tmp_path / "paper", MergeOptions(basis_size=len(odd) - 1), progress=False)
    revert(tmp_path / "paper", tmp_path / "rev-paper", progress=False)
    assert worst_error(odd, tmp_path / "rev-paper") < 4 * u


# --- a budget that keeps nothing is refused, naming the minimum -------------------------------------------


def smallest_useful_ratio(paths) -> float:
    """The smallest --storage-ratio at which plain joint sharing keeps one direction somewhere, from the adapter
    files: per module, U (out x 1), V (in x 1) and one number per task, over all tasks' numbers of that module."""
    shapes = {}
    for p in paths:
        w = load_file(p / "adapter_model.safetensors")
        for k in w:
            if k.endswith(".lora_A.weight"):
                (r, n_in), (n_out, _) = w[k].shape, w[k.replace("lora_A", "lora_B")].shape
                shapes.setdefault(k, []).append((r, n_out, n_in))
    return min(
        (n_out + n_in + len(s)) / sum(r * (n_out + n_in) for r, _, _ in s)
        for s in shapes.values()
        for _, n_out, n_in in s[:1]
    )


def test_a_budget_that_keeps_nothing_is_refused_naming_one_that_does(adapters, tmp_path, capsys):
    from rmm.cli import main

    paths = adapters[:3]
    assert main(["merge", *map(str, paths), "--out", str(tmp_path / "b"), "--storage-ratio", "1e-9"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "keeps nothing" in err
        and (found := re.search(r"sure to keep something is ([0-9.e-]+) ", err))
    ), err
    named = float(found[1])
    assert smallest_useful_ratio(paths) <= named <= 1.01 * smallest_useful_ratio(paths), err
    assert not (tmp_path / "b").exists()
    # At the ratio it names, something is kept: some task's dW error is below 1.
    assert main(["merge", *map(str, paths), "--out", str(tmp_path / "b"), "--storage-ratio", str(named), "--json"]) == 0
    report = json.loads((tmp_path / "b" / "manifest.json").read_text())["report"]
    assert report["storage"]["ratio"] <= named
    assert min(e for t in report["errors"].values() for e in t.values()) < 1


# --- the demo table ----------------------------------------------------------------------------------------


def test_readme_demo_table_is_the_one_the_demo_results_give():
    """The README's demo table is written by `make demo` from what it measured (benchmarks/results/demo.json),
    for the demo's current columns: never by hand."""
    from benchmarks.quality.score import with_summary
    from workers.demo import FEDERATED, MARKERS, README, RESULTS, SETTINGS, render

    record = json.loads((RESULTS / "demo.json").read_text())
    assert list(record["accuracy"]) == ["LoRA off", "orig", *(label for label, _ in SETTINGS), FEDERATED[0]]
    text = README.read_text()
    assert all(m in text for m in MARKERS) and with_summary(text, render(record), MARKERS) == text
    assert (RESULTS / "demo.md").read_text() == render(record)
