"""The `rmm` command end to end, in process."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import file_deltas
from rmm.cli import main


def dense_errors(original, reverted) -> dict[str, float]:
    """Relative dW error per module of a reverted adapter, from both directories' files."""
    want, got = file_deltas(original), file_deltas(reverted)
    assert want.keys() == got.keys()
    return {m: float((got[m] - want[m]).norm() / want[m].norm()) for m in want}


def assert_task_row(row: dict, errors: dict[str, float]):
    """`inspect`'s row of one task against the errors measured on its reverted adapter."""
    assert row["mean_error"] == pytest.approx(sum(errors.values()) / len(errors), rel=1e-4)
    assert row["max_error"] == pytest.approx(max(errors.values()), rel=1e-4)
    assert errors[row["worst_module"]] == pytest.approx(max(errors.values()), rel=1e-4)


def spread_kept(adapters, key: str, p: int) -> float:
    """Share of the tasks' spread around the per-position mean that the top p directions keep, by per-position SVD of
    one factor (`key`, e.g. "<module>.lora_B.weight"; lora_A's columns are its positions)."""
    X = torch.stack([load_file(a / "adapter_model.safetensors")[key].double() for a in adapters])
    X = X.mT if ".lora_A." in key else X  # (T, positions, r)
    S2 = torch.linalg.svdvals((X - X.mean(0)).transpose(0, 1)) ** 2  # (positions, min(T, r))
    return float(S2[:, :p].sum() / S2.sum())


@pytest.mark.parametrize("verb", ["merge", "revert", "inspect", "extract", "baseline", "simulate", "certs"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: rmm " + verb in capsys.readouterr().out


def test_merge_inspect_revert(adapters, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert (
        main(
            [
                "merge",
                *map(str, adapters),
                "--out",
                str(bundle),
                "--method",
                "rmm-paper",
                "--storage-ratio",
                "0.7",
                "--json",
            ]
        )
        == 0
    )
    merged = json.loads(capsys.readouterr().out)
    assert merged["tasks_count"] == 5 and merged["p"] == 1  # r=4, T=5: p=1 gives 0.65, p=2 1.1
    assert merged["storage"]["ratio_counted"] == pytest.approx(0.65) == merged["storage"]["ratio_formula"]

    assert main(["inspect", str(bundle), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert set(inspected["tasks"]) == {a.name for a in adapters}
    for name, row in inspected["modules"].items():
        assert row["stored"] == "p=1"
        for factor in "BA":
            assert row["energy"][factor] == pytest.approx(
                spread_kept(adapters, f"{name}.lora_{factor}.weight", 1), rel=1e-4
            )

    assert main(["inspect", str(bundle)]) == 0
    shown = capsys.readouterr().err
    assert "task4" in shown and "energy" in shown

    assert main(["revert", str(bundle), "--out", str(tmp_path / "rev"), "--task", "task1", "--task", "task3"]) == 0
    assert sorted(p.name for p in (tmp_path / "rev").iterdir()) == ["task1", "task3"]
    for a in adapters[1:4:2]:
        assert_task_row(inspected["tasks"][a.name], dense_errors(a, tmp_path / "rev" / a.name))
    assert main(["revert", str(bundle), "--out", str(tmp_path / "rev"), "--task", "nope"]) == 2
    assert "no task 'nope'" in capsys.readouterr().err


def test_baseline_verb(adapters, tmp_path, capsys):
    assert main(["baseline", "--list"]) == 0
    assert "truncate" in capsys.readouterr().err
    out = tmp_path / "t"
    assert main(["baseline", "truncate", *map(str, adapters), "--out", str(out), "--param", "rank=2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["storage_ratio"] == pytest.approx(0.5) and sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        a.name for a in adapters
    ]
    for a in adapters:  # each task's dW cut to its top two singular directions
        want, got = file_deltas(a), file_deltas(out / a.name)
        for m, dW in want.items():
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            torch.testing.assert_close(got[m], (U[:, :2] * S[:2]) @ Vh[:2], rtol=1e-5, atol=1e-6)
    assert main(["baseline", "nope", *map(str, adapters), "--out", str(tmp_path / "n")]) == 2


def test_default_merge_shows_its_allocation(adapters, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["merge", *map(str, adapters), "--out", str(bundle), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["options"]["method"] == "auto" and merged["storage"]["ratio_counted"] <= 0.5
    assert sum(merged["allocation"].values()) == merged["modules_count"] and merged["allocation"]["shared"] == 0
    assert merged["storage"]["ratio_counted"] == pytest.approx(merged["storage"]["ratio_formula"])
    assert main(["revert", str(bundle), "--out", str(tmp_path / "rev")]) == 0
    originals = {a.name: file_deltas(a) for a in adapters}
    reverted = {a.name: file_deltas(tmp_path / "rev" / a.name) for a in adapters}
    for a in adapters:
        assert_task_row(merged["tasks"][a.name], dense_errors(a, tmp_path / "rev" / a.name))
    for name, row in merged["modules"].items():  # energy kept: sum_t ||reverted dW_t||^2 / sum_t ||dW_t||^2
        assert row["stored"].startswith(("truncate", "joint"))
        kept = sum(float((d[name] ** 2).sum()) for d in reverted.values()) / sum(
            float((d[name] ** 2).sum()) for d in originals.values()
        )
        assert row["energy"]["dW"] == pytest.approx(kept, rel=1e-4)
    assert main(["inspect", str(bundle)]) == 0
    shown = capsys.readouterr().err
    assert "method auto" in shown and "stored as" in shown


def test_a_site_loads_nothing_of_the_coordinator(tmp_path):
    """`import workers.cli`, then `rmm site run` up to joining Ray, in a fresh interpreter: the only coordinator
    module loaded is its verb registration (every `rmm` verb loads the entry points), never its server, state
    or config."""
    with socket.socket() as s:  # a port where nothing listens: the site stops at joining Ray, after all its imports
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    site_run = [
        "site",
        "run",
        "--coordinator",
        "127.0.0.1:1",
        "--federation",
        "f",
        "--site",
        "a",
        "--insecure",
        "--canonicalize",
        "--adapters",
        "x",
        "--out",
        str(tmp_path / "out"),
        "--ray-address",
        dead,
    ]
    script = f"""
import json, sys
coordinator = lambda: sorted(m for m in sys.modules if m.partition(".")[0] == "coordinator")
import workers.cli
imported = coordinator()
from rmm.cli import main
code = main({site_run!r})
print(json.dumps({{"imported": imported, "code": code, "site_run": coordinator()}}))
"""
    env = {**os.environ, "RMM_SITE_TOKEN": "t"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert f"cannot join the Ray cluster at {dead}" in run.stderr  # the site's code path ran as far as Ray
    assert got == {"imported": [], "code": 2, "site_run": ["coordinator", "coordinator.cli"]}


def test_site_run_refuses_canonicalize_under_method_auto_as_merge_does(tmp_path, capsys, monkeypatch):
    """One rule for what implies what: --canonicalize implies rmm-paper, and contradicts an explicit --method auto."""
    site = [
        "--coordinator",
        "127.0.0.1:1",
        "--federation",
        "f",
        "--site",
        "a",
        "--insecure",
        "--adapters",
        "x",
        "--out",
        str(tmp_path),
        "--retry-seconds",
        "1",
        "--ray-address",
        "127.0.0.1:1",
    ]
    assert main(["merge", "x", "--out", str(tmp_path / "b"), "--method", "auto", "--canonicalize"]) == 2
    merge_error = capsys.readouterr().err
    monkeypatch.setenv("RMM_SITE_TOKEN", "t")
    assert main(["site", "run", *site, "--method", "auto", "--canonicalize"]) == 2
    site_error = capsys.readouterr().err
    assert "canonicalize apply to method rmm-paper" in merge_error
    assert site_error == merge_error
