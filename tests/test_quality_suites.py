"""The quality suites are real: adapters trained here on pydoc text load with PEFT, beat the base on
their own task by a clear margin, are scored deterministically, and are cached so a rebuild costs nothing."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from benchmarks.quality import suites as S

# A reduced *few*: two families, short training; the full suites use the same code path.
SUBSET = ("upper", "rot13")
SMALL = dict(families=SUBSET, base_steps=150, adapter_steps=60, eval_n=16)
MARGIN = 0.10  # accuracy points an adapter must gain over the base on its own task


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("quality-cache")  # one cache, so every reduced suite shares one base


@pytest.fixture(scope="module")
def built(cache):
    return cache, S.build_suite("few", cache, progress=False, spec=S.suite_spec("few", **SMALL))


def snapshot(folder: Path) -> dict:
    return {
        str(f.relative_to(folder)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def test_full_specs_have_the_required_shape():
    few, many = S.suite_spec("few"), S.suite_spec("many")
    assert S.SUITES == ("few", "many", "hetero", "pt-svd", "released", "encoder", "encoder-few")
    assert len(few["adapters"]) >= 6
    assert len({a["family"] for a in few["adapters"].values()}) == len(few["adapters"])  # all different
    assert len(many["adapters"]) >= 32
    families = {a["family"] for a in many["adapters"].values()}
    assert 4 <= len(families) <= 8
    for f in families:  # variants of one family differ in data, seed and learning rate
        variants = [a for a in many["adapters"].values() if a["family"] == f]
        for key in ("topics", "seed", "lr"):
            assert len({json.dumps(v[key]) for v in variants}) > 1, (f, key)
    assert few["base"] == many["base"]  # one shared base
    hetero, pt_svd = S.suite_spec("hetero"), S.suite_spec("pt-svd")
    assert hetero["base"] == pt_svd["base"] == few["base"]
    loras = [a["lora"] for a in hetero["adapters"].values()]
    assert len(loras) >= 6 and {lo["r"] for lo in loras} == {4, 8, 16}
    assert any(lo.get("use_rslora") for lo in loras) and not all(lo.get("use_rslora") for lo in loras)
    assert len({a["family"] for a in hetero["adapters"].values()}) == len(loras)
    assert len(pt_svd["adapters"]) >= 6
    for a in pt_svd["adapters"].values():
        assert a["kind"] == "full" and "lora" not in a and a["extract"]["rank"] == 8
        assert sorted(a["extract"]["target_modules"]) == sorted(S.LORA["target_modules"])
    with pytest.raises(ValueError):
        S.suite_spec("nope")


def test_text_is_split_and_transformed():
    train, held_out = S.topic_split()
    assert len(held_out) >= 15 and not set(train) & set(held_out)
    plain = S.decode(S.eval_windows(None, 4)[1].tolist())
    assert S.decode(S.eval_windows("upper", 4)[1].tolist()) != plain
    assert S.TRANSFORMS["rot13"]("Abc xyz") == "Nop klm"
    assert S.TRANSFORMS["reverse_words"]("ab, cd") == "ba, dc"
    assert S.TRANSFORMS["pig_latin"]("hello a") == "ellohay a"
    assert S.TRANSFORMS["no_vowels"]("Alpha beta") == "lph bt"
    assert S.TRANSFORMS["reverse_lines"]("ab\ncd") == "ba\ndc"
    assert S.TRANSFORMS["double"]("ab c") == "aabb cc"
    assert S.TRANSFORMS["atbash"]("Az") == "Za"
    for f in S.FAMILIES:
        w = S.eval_windows(f, 8)
        assert w.shape == (8, S.CTX + 1) and int(w.max()) < S.VOCAB
        assert torch.equal(w, S.eval_windows(f, 8))


def test_layout_and_peft_loading(built):
    _, suite = built
    assert list(suite.adapters) == list(SUBSET) and suite.task_of == {t: t for t in SUBSET}
    base = LlamaForCausalLM.from_pretrained(suite.base_dir / "model")
    for name, adapter_dir in suite.adapters.items():
        assert adapter_dir.name == name
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8
        assert config["base_model_name_or_path"] == str(suite.base_dir / "model")
        weights = load_file(adapter_dir / "adapter_model.safetensors")
        lora_b = [v for k, v in weights.items() if "lora_B" in k]
        assert len(lora_b) == 7 * 2  # 7 target modules in 2 layers
        assert all(v.abs().sum() > 0 for v in lora_b), "some LoRA module was not trained"
        model = PeftModel.from_pretrained(base, adapter_dir)
        assert model.active_peft_config.r == 8
        base = model.unload()


def test_each_adapter_beats_the_base_on_its_task_deterministically(built):
    _, suite = built
    for name, adapter_dir in suite.adapters.items():
        task = suite.task_of[name]
        base_acc = S.evaluate(suite, None, task)
        acc = S.evaluate(suite, adapter_dir, task)
        assert acc == S.evaluate(suite, adapter_dir, task)  # deterministic, to the bit
        assert acc >= base_acc + MARGIN, (name, base_acc, acc)


def test_cache_is_reused_without_retraining(built):
    cache, suite = built
    before = snapshot(cache)
    t0 = time.perf_counter()
    again = S.build_suite("few", cache, progress=False, spec=S.suite_spec("few", **SMALL))
    assert time.perf_counter() - t0 < 2.0
    assert again.adapters == suite.adapters and again.base_dir == suite.base_dir
    assert snapshot(cache) == before
    assert not [p for p in cache.rglob(".*") if p.is_dir()], "a temporary build folder was left behind"
    # A different spec is a different folder; the base (same spec) is shared.
    other = S.suite_spec("few", **dict(SMALL, adapter_steps=SMALL["adapter_steps"] + 1))
    assert S._hash(other) != S._hash(suite.spec) and S._hash(other["base"]) == S._hash(suite.spec["base"])


def test_scoring_counts_retained_gain_and_storage(built, tmp_path):
    """Full-rank truncation keeps every gain at storage 1; a single merged model stores 1/T."""
    from benchmarks.quality.score import score, table

    _, suite = built
    results = [score(suite, "truncate", {"storage_ratio": 1.0}, tmp_path), score(suite, "ta-dw", {}, tmp_path)]
    rows = {r["method"]: r for r in table(suite, results)["rows"]}
    assert rows["truncate"]["storage_ratio"] == pytest.approx(1.0)
    assert rows["truncate"]["retained_gain"] == pytest.approx(1.0, abs=1e-6) and rows["truncate"][
        "min_normalized"
    ] == pytest.approx(1.0, abs=1e-6)
    assert rows["ta-dw"]["storage_ratio"] == pytest.approx(1 / len(suite.adapters))
    assert rows["ta-dw"]["retained_gain"] < 1.0
    again = score(suite, "ta-dw", {}, tmp_path / "other")  # cached: same numbers, no work directory made
    assert again["accuracy"] == results[1]["accuracy"] and not (tmp_path / "other").exists()


def test_calibration_data_is_each_adapters_training_text_and_the_calibrated_default_uses_it(built, tmp_path):
    """64 windows per adapter of its family's transformed training topics (never held-out text), written once; the
    row "auto-calibrated" merges with them (at storage 1 it keeps every gain) and records what calibration chose."""
    from benchmarks.quality.score import CALIBRATED, score, table

    _, suite = built
    data = S.calibration_dir(suite)
    assert sorted(p.name for p in data.iterdir()) == sorted(f"{a}.jsonl" for a in suite.adapters)
    for a, s in suite.spec["adapters"].items():
        text = S.TRANSFORMS[s["family"]]("\n\n".join(S._topics()[t] for t in S.topic_subset(*s["topics"])))
        text = S.decode(S.encode(text))  # characters outside the alphabet read "?"
        rows = [json.loads(line)["input_ids"] for line in (data / f"{a}.jsonl").read_text().splitlines()]
        assert len(rows) == S.CALIBRATION_N and {len(r) for r in rows} == {S.CTX} and len({tuple(r) for r in rows}) > 60
        assert all(S.decode(r) in text for r in rows)  # (pydoc's topics repeat some sentences: no test against them)
        assert not {tuple(r) for r in rows} & {tuple(w) for w in S.eval_windows(s["family"], 64)[:, :-1].tolist()}
    before = snapshot(data)
    assert S.calibration_dir(suite) == data and snapshot(data) == before  # written once

    result = score(suite, CALIBRATED, {"storage_ratio": 1.0, "calibration_examples": S.CALIBRATION_N}, tmp_path)
    assert result["calibration"]["chosen"] in result["calibration"]["candidates"]
    (row,) = table(suite, [result])["rows"]
    assert row["kind"] == "reversible" and row["storage_ratio"] <= 1.0
    assert row["retained_gain"] == pytest.approx(1.0, abs=1e-6)


def test_calibration_evidence_scores_every_candidate_plan(built, tmp_path):
    """benchmarks/quality/calibration.py: every plan merge weighed, reverted and scored; plain truncation among them
    keeps what `rmm baseline truncate` keeps; calibration's pick has the least KL, the data-free pick the least dW
    objective; rho is of gain against -objective."""
    from benchmarks.quality.calibration import _rho, measure
    from benchmarks.quality.score import score, table
    from rmm.allocate import DATA_FREE

    _, suite = built
    found = measure(suite, 0.5, tmp_path)
    rows = found["candidates"]
    assert len(rows) >= 3 and all(r["storage_ratio"] <= 0.5 + 1e-9 for r in rows.values())
    (truncate,) = table(suite, [score(suite, "truncate", {"storage_ratio": 0.5}, tmp_path)])["rows"]
    assert rows["truncate"]["retained_gain"] == pytest.approx(truncate["retained_gain"], abs=1e-3)
    assert found["calibrated"] == min(rows, key=lambda n: rows[n]["kl_total"])
    assert found["data_free"] == min((n for n in rows if n in DATA_FREE), key=lambda n: rows[n]["dw_objective"])
    assert found["best"] == max(rows, key=lambda n: rows[n]["retained_gain"])
    plans = [{"retained_gain": g, "dw_objective": o} for g, o in ((0.9, 1.0), (0.5, 2.0), (0.1, 3.0))]
    assert _rho(plans, "dw_objective") == pytest.approx(1.0) and _rho(plans[:2], "dw_objective") is None


# --- hetero and pt-svd, reduced the same way (sharing the base built above) -----------------------


@pytest.fixture(scope="module")
def hetero(cache):
    return S.build_suite("hetero", cache, progress=False, spec=S.suite_spec("hetero", **SMALL))


@pytest.fixture(scope="module")
def pt_svd(cache):
    return S.build_suite("pt-svd", cache, progress=False, spec=S.suite_spec("pt-svd", **SMALL))


def test_hetero_adapters_have_their_ranks_and_rslora_and_beat_the_base(hetero):
    specs = hetero.spec["adapters"]
    assert [specs[a]["lora"]["r"] for a in SUBSET] == [4, 16]  # the first two of the full suite's configs
    assert [bool(specs[a]["lora"].get("use_rslora")) for a in SUBSET] == [False, True]
    for name, adapter_dir in hetero.adapters.items():
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        lora = specs[name]["lora"]
        assert config["r"] == lora["r"] and config["lora_alpha"] == lora["lora_alpha"]
        assert config["use_rslora"] == bool(lora.get("use_rslora"))
        weights = load_file(adapter_dir / "adapter_model.safetensors")
        # A is r x in: 64 wide, or 192 for down_proj
        assert {tuple(v.shape) for k, v in weights.items() if "lora_A" in k} == {(lora["r"], 64), (lora["r"], 192)}
        task = hetero.task_of[name]
        assert S.evaluate(hetero, adapter_dir, task) >= S.evaluate(hetero, None, task) + MARGIN, name


def test_pt_svd_adapters_are_extracted_from_full_fine_tunes_and_keep_their_accuracy(pt_svd):
    assert set(pt_svd.full) == set(pt_svd.adapters) == set(SUBSET)
    base = LlamaForCausalLM.from_pretrained(pt_svd.base_dir / "model")
    rows = S.report(pt_svd)["rows"]
    for name, adapter_dir in pt_svd.adapters.items():
        ft_dir = pt_svd.full[name]
        assert (ft_dir / "config.json").is_file() and (ft_dir / "model.safetensors").is_file()
        summary = json.loads((ft_dir / "extract.json").read_text())
        assert summary["r"] == 8 and not summary["skipped"]  # only the projections were trained
        assert len(summary["modules"]) == 7 * 2
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["base_model_name_or_path"] == str(pt_svd.base_dir / "model")
        model = PeftModel.from_pretrained(base, adapter_dir)
        assert model.active_peft_config.r == 8
        base = model.unload()
        row = rows[name]
        assert row["adapter"] >= row["base"] + MARGIN, (name, row)
        assert row["full"] >= row["adapter"] - 0.1 and abs(row["full"] - row["adapter"]) <= 0.1, (name, row)


def test_readme_quality_table_is_the_one_the_results_give():
    """The README's summary is generated by `rmm bench quality` from benchmarks/results/: never hand-edited."""
    from benchmarks.quality.score import README, summary, with_summary

    text = README.read_text()
    assert "quality summary" in text and with_summary(text, summary()) == text


def test_released_customers_start_from_the_published_adapter(cache):
    """*released*: every customer's adapter carries the published multi-task adapter it started from."""
    from rmm.adapter import open_adapter
    from rmm.metrics import frobenius_inner

    spec = S.suite_spec("released", **SMALL)
    assert list(spec["published"]) == ["released"] and all(a["start"] == "released" for a in spec["adapters"].values())
    suite = S.build_suite("released", cache, progress=False, spec=spec)
    published = open_adapter(next(iter(suite.adapters.values())).parent.parent / "published" / "released")
    for path in suite.adapters.values():
        mine = open_adapter(path)
        for m in mine.modules:
            (B1, A1), (B2, A2) = mine.load_factors(m), published.load_factors(m)
            cos = (
                frobenius_inner(B1, A1, B2, A2)
                / (frobenius_inner(B1, A1, B1, A1) * frobenius_inner(B2, A2, B2, A2)).sqrt()
            )
            assert 0.3 < cos < 0.9999, (path.name, m, cos.item())  # shares the published update, and moved on
