"""The `rmm` command end to end, in process."""

import json

import pytest

from rmm.cli import main


@pytest.mark.parametrize("verb", ["merge", "revert", "inspect", "extract", "baseline", "simulate", "certs"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: rmm " + verb in capsys.readouterr().out


def test_merge_inspect_revert(adapters, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["merge", *map(str, adapters), "--out", str(bundle), "--method", "rmm-paper", "--storage-ratio", "0.7", "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["tasks_count"] == 5 and merged["p"] == 1  # r=4, T=5: p=1 gives 0.65, p=2 1.1
    assert merged["storage"]["ratio_counted"] == pytest.approx(0.65) == merged["storage"]["ratio_formula"]

    assert main(["inspect", str(bundle), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["tasks"] == merged["tasks"]
    assert set(inspected["tasks"]["task0"]) == {"mean_error", "max_error", "worst_module"}
    assert all(0 < m["energy"]["B"] < 1 and 0 < m["energy"]["A"] < 1 and m["stored"] == "p=1" for m in inspected["modules"].values())

    assert main(["inspect", str(bundle)]) == 0
    shown = capsys.readouterr().err
    assert "task4" in shown and "energy" in shown

    assert main(["revert", str(bundle), "--out", str(tmp_path / "rev"), "--task", "task1", "--task", "task3"]) == 0
    assert sorted(p.name for p in (tmp_path / "rev").iterdir()) == ["task1", "task3"]
    assert main(["revert", str(bundle), "--out", str(tmp_path / "rev"), "--task", "nope"]) == 2
    assert "no task 'nope'" in capsys.readouterr().err


def test_baseline_verb(adapters, tmp_path, capsys):
    assert main(["baseline", "--list"]) == 0
    assert "truncate" in capsys.readouterr().err
    out = tmp_path / "t"
    assert main(["baseline", "truncate", *map(str, adapters), "--out", str(out), "--param", "rank=2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["storage_ratio"] == pytest.approx(0.5) and sorted(p.name for p in out.iterdir() if p.is_dir()) == [a.name for a in adapters]
    assert main(["baseline", "nope", *map(str, adapters), "--out", str(tmp_path / "n")]) == 2


def test_default_merge_shows_its_allocation(adapters, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["merge", *map(str, adapters), "--out", str(bundle), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["options"]["method"] == "auto" and merged["storage"]["ratio_counted"] <= 0.5
    assert sum(merged["allocation"].values()) == merged["modules_count"] and merged["allocation"]["shared"] == 0
    assert merged["storage"]["ratio_counted"] == pytest.approx(merged["storage"]["ratio_formula"])
    for row in merged["modules"].values():
        assert row["stored"].startswith(("truncate", "joint")) and "dW" in row["energy"]
    assert main(["inspect", str(bundle)]) == 0
    shown = capsys.readouterr().err
    assert "method auto" in shown and "stored as" in shown
