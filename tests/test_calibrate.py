"""Calibration (`rmm merge --base --calibration`): each candidate plan's cost to each task, measured apart from rmm
(the reverted adapters written to disk, loaded by PEFT, KL computed here), and the choice it makes."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from conftest import load_base, make_adapter
from rmm.adapter import open_adapters, write_adapter
from rmm.allocate import allocate, candidate_plans, curves
from rmm.baselines import run
from rmm.bundle import MergeOptions, read_manifest
from rmm.calibrate import Calibration
from rmm.cli import main
from rmm.merge import merge, reverted_factors, revert
from rmm.plan import module_specs, numbers_original, planned_modules, stack_factors, storage_dtype

RATIO = 0.3
BERT = BertConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=2
)


def _ids(seed: int, n: int, lengths=(9, 12)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def llama_set(llama_base, tmp_path_factory):
    """Four causal-LM adapters that share structure, examples for all (default.jsonl) and one task's own."""
    root = tmp_path_factory.mktemp("calibrate")
    dirs = [make_adapter(llama_base, root / f"task{t}", seed=10 + t, shared=0.3) for t in range(4)]
    data = root / "data"
    data.mkdir()
    _write(data / "default.jsonl", [{"input_ids": ids} for ids in _ids(0, 12)])
    _write(data / "task2.jsonl", [{"input_ids": ids} for ids in _ids(1, 8, (7,))])
    return llama_base, dirs, data


@pytest.fixture(scope="module")
def bert_set(tmp_path_factory):
    """Three sequence classifiers of 3 classes on a 2-label base: each saves its own head (modules_to_save)."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertForSequenceClassification(BERT).save_pretrained(root / "base")
    dirs = []
    for t in range(3):
        model = BertForSequenceClassification.from_pretrained(root / "base", num_labels=3, ignore_mismatched_sizes=True)
        config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
        model = get_peft_model(model, config)
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name or "classifier" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_pretrained(root / f"cls{t}")
        dirs.append(root / f"cls{t}")
    data = root / "data"
    data.mkdir()
    _write(data / "default.jsonl", [{"input_ids": ids} for ids in _ids(2, 10)])
    return root / "base", dirs, data


def _model(base, adapter_dir, task_type):
    if task_type == "SEQ_CLS":
        model = BertForSequenceClassification.from_pretrained(base, num_labels=3, ignore_mismatched_sizes=True)
    else:
        model = load_base(base)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def _rows(data, task) -> list[list[int]]:
    file = data / f"{task}.jsonl" if (data / f"{task}.jsonl").is_file() else data / "default.jsonl"
    return [json.loads(line)["input_ids"] for line in file.read_text().splitlines()]


def _measured_kl(base, original, candidate, rows, task_type) -> float:
    """Mean KL(original || candidate) over every output distribution, one example at a time, from PEFT's loads."""
    a, b = _model(base, original, task_type), _model(base, candidate, task_type)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids])
            p = torch.log_softmax(a(input_ids=x).logits.double(), -1).reshape(-1, a(input_ids=x).logits.shape[-1])
            q = torch.log_softmax(b(input_ids=x).logits.double(), -1).reshape(p.shape)
            total += F.kl_div(q, p, log_target=True, reduction="sum").item()
            count += p.shape[0]
    return total / count


# The baselines that store each kind's plain plan: their reverted adapters are written by code apart from merge's.
PLAIN = {"truncate": ("truncate", {}), "joint": ("joint", {}), "shared": ("rmm-paper", {})}


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_each_plain_candidates_divergence_is_what_peft_measures(which, llama_set, bert_set, tmp_path):
    base, dirs, data = llama_set if which == "llama" else bert_set
    task_type = "SEQ_CLS" if which == "bert" else None
    manifest = merge(dirs, tmp_path / "bundle", MergeOptions(storage_ratio=RATIO), calibration=Calibration(base, data))
    found = manifest.report.calibration
    present = [kind for kind in PLAIN if kind in found.candidates]  # a plain plan equal to an earlier one is left out
    assert {"truncate", "joint"} <= set(present)
    for kind in present:
        method, params = PLAIN[kind]
        out = tmp_path / method
        summary = run(method, dirs, out, storage_ratio=RATIO, **params)
        assert summary["storage_ratio"] == pytest.approx(found.candidates[kind].storage_ratio)
        for d in dirs:
            want = _measured_kl(base, d, out / d.name, _rows(data, d.name), task_type)
            assert found.candidates[kind].divergence[d.name] == pytest.approx(want, rel=1e-4, abs=1e-9), (kind, d.name)
    # The bundle written is the chosen candidate, as revert rebuilds it: its measured cost is the one reported.
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    chosen = found.candidates[found.chosen]
    for d in dirs:
        want = _measured_kl(base, d, tmp_path / "rev" / d.name, _rows(data, d.name), task_type)
        assert chosen.divergence[d.name] == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert chosen.total == min(c.total for c in found.candidates.values())
    assert manifest.report.storage.ratio == pytest.approx(chosen.storage_ratio) and chosen.storage_ratio <= RATIO


def test_calibration_keeps_the_plan_the_outputs_prefer_where_dw_error_prefers_another(llama_set, tmp_path):
    """Every candidate plan written as PEFT adapters and measured here: the calibrated merge keeps the one whose
    measured divergence is least, and on this set that is not the plan of least dW error (the data-free default)."""
    base, dirs, data = llama_set
    adapters = open_adapters(dirs)
    specs = module_specs(adapters)
    found = [
        curves(*stack_factors(adapters, m, canonical=False), [a.modules[m.name].rank for a in adapters]) for m in specs
    ]
    budget = RATIO * numbers_original(adapters)
    names = [a.name for a in adapters]
    measured = {}
    for name, plan in candidate_plans(found, budget).items():
        factors = reverted_factors(adapters, planned_modules(specs, plan, names), storage_dtype(adapters))
        for a, f in zip(adapters, factors):
            write_adapter(tmp_path / name / a.name, a.config, f, a.load_extras(), a.dtype)
        measured[name] = sum(_measured_kl(base, d, tmp_path / name / d.name, _rows(data, d.name), None) for d in dirs)
    best = min(measured, key=measured.get)
    data_free = planned_modules(specs, allocate(found, budget), names)
    manifest = merge(dirs, tmp_path / "bundle", MergeOptions(storage_ratio=RATIO), calibration=Calibration(base, data))
    assert manifest.report.calibration.chosen == best
    assert manifest.modules == planned_modules(specs, candidate_plans(found, budget)[best], names)
    assert manifest.modules != data_free, "this set no longer separates the two objectives: the test would not fail"
    plain = merge(dirs, tmp_path / "plain", MergeOptions(storage_ratio=RATIO), progress=False)
    assert plain.modules == data_free and plain.report.calibration is None


def test_text_examples_are_tokenised_by_the_bases_tokenizer(llama_set, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    base, dirs, _ = llama_set
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1, 64)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with_tokenizer = shutil.copytree(base, tmp_path / "base")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(with_tokenizer)
    ids = _ids(3, 6)
    text, numeric = tmp_path / "text", tmp_path / "ids"
    text.mkdir(), numeric.mkdir()
    _write(text / "default.jsonl", [{"text": " ".join(f"w{i}" for i in r)} for r in ids])
    _write(numeric / "default.jsonl", [{"input_ids": r} for r in ids])
    a = merge(dirs, tmp_path / "a", MergeOptions(storage_ratio=RATIO), calibration=Calibration(with_tokenizer, text))
    b = merge(dirs, tmp_path / "b", MergeOptions(storage_ratio=RATIO), calibration=Calibration(with_tokenizer, numeric))
    assert a.report.calibration.candidates == b.report.calibration.candidates
    assert a.report.calibration.files != b.report.calibration.files  # each records the sha256 of its own file


def test_the_cli_reports_every_candidate_and_inspect_shows_them(llama_set, tmp_path, capsys):
    base, dirs, data = llama_set
    argv = ["merge", *map(str, dirs), "--out", str(tmp_path / "b"), "--storage-ratio", str(RATIO)]
    assert main([*argv, "--base", str(base), "--calibration", str(data), "--calibration-examples", "3", "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)["calibration"]
    assert merged["examples"] == 3 and merged["chosen"] in merged["candidates"]
    assert read_manifest(tmp_path / "b").report.calibration.model_dump() == merged
    assert main(["inspect", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"] == merged


def _refusal(case, llama_set, tmp_path):
    base, dirs, data = llama_set
    argv = ["merge", *map(str, dirs), "--out", str(tmp_path / "out"), "--storage-ratio", str(RATIO)]
    bad = tmp_path / "data"
    if case == "no base":
        return [*argv, "--calibration", str(data)], "--base"
    if case == "rmm-paper":
        return [*argv, "--base", str(base), "--calibration", str(data), "--method", "rmm-paper"], "method auto"
    if case == "base not a model":
        return [*argv, "--base", str(tmp_path), "--calibration", str(data)], "config.json"
    bad.mkdir()
    if case == "no examples for a task":
        _write(bad / "task0.jsonl", [{"input_ids": [1, 2]}])
        return [*argv, "--base", str(base), "--calibration", str(bad)], "task1"
    if case == "bad line":
        _write(bad / "default.jsonl", [{"input_ids": [1, 2]}, {"input_ids": "oops"}])
        return [*argv, "--base", str(base), "--calibration", str(bad)], "line 2"
    if case == "both ids and text":
        _write(bad / "default.jsonl", [{"input_ids": [1], "text": "a"}])
        return [*argv, "--base", str(base), "--calibration", str(bad)], "exactly one"
    if case == "text without a tokenizer":
        _write(bad / "default.jsonl", [{"text": "hello"}])
        return [*argv, "--base", str(base), "--calibration", str(bad)], "tokenizer"
    if case == "task type":
        other = shutil.copytree(dirs[0], tmp_path / "qa")
        config = json.loads((other / "adapter_config.json").read_text()) | {"task_type": "QUESTION_ANS"}
        (other / "adapter_config.json").write_text(json.dumps(config))
        _write(bad / "default.jsonl", [{"input_ids": [1, 2]}])
        argv = ["merge", str(other), *map(str, dirs[1:]), "--out", str(tmp_path / "out"), "--storage-ratio", "0.3"]
        return [*argv, "--base", str(base), "--calibration", str(bad)], "QUESTION_ANS"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "no base",
        "rmm-paper",
        "base not a model",
        "no examples for a task",
        "bad line",
        "both ids and text",
        "text without a tokenizer",
        "task type",
    ],
)
def test_bad_calibration_is_refused_in_one_line(case, llama_set, tmp_path, capsys):
    argv, fragment = _refusal(case, llama_set, tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and "\n" not in err, err
    assert fragment in err, err
    assert not (tmp_path / "out").exists()
