"""The encoder suites are real: sentence classifiers on the pretrained MiniLM (pip package, offline), each a
PEFT SEQ_CLS LoRA with its own head, beating their heads alone; `rmm merge` + `rmm revert` keep them."""

from __future__ import annotations

import json
import random

import pytest
from peft import PeftModel
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from benchmarks.quality import encoder as E
from benchmarks.quality import suites as S
from rmm.cli import main

# A reduced *encoder*: 2 families x 2 variants, short training, a smaller held-out set.
SMALL = dict(families=("question", "negation"), variants=2, adapter_steps=20, eval_n=128)
MARGIN = 0.10  # accuracy points an adapter must gain over its own head with the LoRA off


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    cache = tmp_path_factory.mktemp("encoder-cache")
    return S.build_suite("encoder", cache, progress=False, spec=E.suite_spec("encoder", **SMALL))


def test_full_specs_have_the_required_shape():
    many, few = S.suite_spec("encoder"), S.suite_spec("encoder-few")
    assert {"encoder", "encoder-few"} <= set(S.SUITES)
    assert len(many["adapters"]) >= 24 and len(few["adapters"]) == len(E.FEW_FAMILIES) >= 3
    families = {a["family"] for a in many["adapters"].values()}
    assert len(families) == 8
    for f in families:  # variants of one family differ in data, seed and learning rate
        variants = [a for a in many["adapters"].values() if a["family"] == f]
        for key in ("data", "seed", "lr"):
            assert len({json.dumps(v[key]) for v in variants}) > 1, (f, key)
    for a in (*many["adapters"].values(), *few["adapters"].values()):
        assert a["lora"]["task_type"] == "SEQ_CLS" and a["lora"]["modules_to_save"] == ["classifier"]
    assert many["base"] == few["base"]


def test_messages_are_one_domain_labelled_by_rule():
    text, labels = E.message(random.Random(3))
    assert E.messages("eval", 8) == E.messages("eval", 8)  # deterministic
    texts, by_family = E.messages("train", 2000)
    for fam, ys in by_family.items():
        assert 0.3 < sum(ys) / len(ys) < 0.7, fam  # both classes well represented
    for t, q, neg, praise in zip(texts, by_family["question"], by_family["negation"], by_family["praise"]):
        assert q == t.endswith("?")
        assert neg == (" not " in t)
        assert praise == any(f" {w}" in t for w in E.GOOD), t
    assert isinstance(text, str) and set(labels) == set(E.FAMILIES)


def test_adapters_load_with_their_own_heads_and_beat_them(suite):
    base = BertForSequenceClassification.from_pretrained(suite.base_dir / "model")
    heads = []
    for name, adapter_dir in suite.adapters.items():
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["r"] == 8 and "classifier" in config["modules_to_save"]
        weights = load_file(adapter_dir / "adapter_model.safetensors")
        heads.append(next(v for k, v in weights.items() if "classifier" in k and k.endswith("weight")))
        assert sum("lora_B" in k for k in weights) == 6 * 2  # query and value in 6 layers
        model = PeftModel.from_pretrained(base, adapter_dir)
        assert model.active_peft_config.task_type == "SEQ_CLS"
        base = model.unload()
        task = suite.task_of[name]
        acc, head_only = S.evaluate(suite, adapter_dir, task), S.baseline(suite, name)
        assert acc == S.evaluate(suite, adapter_dir, task)  # deterministic, to the bit
        assert acc >= head_only + MARGIN, (name, head_only, acc)
    assert all(not (h == heads[0]).all() for h in heads[1:])  # a head per adapter


def test_merge_and_revert_at_full_storage_keep_every_accuracy(suite, tmp_path):
    bundle, out = tmp_path / "bundle", tmp_path / "reverted"
    assert main(["merge", *map(str, suite.adapters.values()), "--out", str(bundle), "--storage-ratio", "1"]) == 0
    assert main(["revert", str(bundle), "--out", str(out)]) == 0
    for name, adapter_dir in suite.adapters.items():
        task = suite.task_of[name]
        assert S.evaluate(suite, out / name, task) == pytest.approx(S.evaluate(suite, adapter_dir, task), abs=1e-9)
    # A single merged model has no head per task: it is scored with each task's own.
    from benchmarks.quality.score import score, table

    # ours, and PEFT's add_weighted_adapter (which refuses adapters that each carry a head)
    for row in table(suite, [score(suite, m, {}, tmp_path / "work") for m in ("ta-dw", "peft-svd")])["rows"]:
        assert row["storage_ratio"] == pytest.approx(1 / len(suite.adapters)) and row["retained_gain"] < 1, row


def test_calibration_data_is_each_adapters_training_messages_unpadded(suite, tmp_path):
    """Each adapter's calibration examples are its own first training messages, tokenised alone (no padding), none
    of them a held-out message; the calibrated default merges the classifiers with them (exact at storage 1)."""
    from transformers import AutoTokenizer

    from benchmarks.quality.score import CALIBRATED, score, table

    data = S.calibration_dir(suite)
    tokenizer = AutoTokenizer.from_pretrained(suite.base_dir / "model")
    train, held_out = E.messages("train", E.TRAIN_N)[0], set(E.messages("eval", E.EVAL_N)[0])
    for a, s in suite.spec["adapters"].items():
        rows = [json.loads(line)["input_ids"] for line in (data / f"{a}.jsonl").read_text().splitlines()]
        part, parts = s["data"]
        mine = train[part::parts][: S.CALIBRATION_N]
        assert rows == [tokenizer(t)["input_ids"] for t in mine] and not held_out & set(mine)
    result = score(suite, CALIBRATED, {"storage_ratio": 1.0, "calibration_examples": S.CALIBRATION_N}, tmp_path)
    for row in table(suite, [result])["rows"]:
        assert row["retained_gain"] == pytest.approx(1.0, abs=1e-6), row
