"""The example adapters are real: they load with PEFT, solve their tasks, need their LoRA weights,
and are cached so a second build costs nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rmm import examples
from rmm.examples import A, B, HIGH, LENGTH, TASKS, build_examples, dataset, evaluate

# Two tasks keep the test near 15 s of training; the other tasks use the same code path.
SUBSET = ("late_a", "front_heavy")

# Independent definitions of every task, to check the generators against.
ORACLES = {
    "majority": lambda x: x.count(A) > x.count(B),
    "contains": lambda x: A in x,
    "many_a": lambda x: x.count(A) >= 3,
    "first_high": lambda x: x[0] in HIGH,
    "late_a": lambda x: x.index(A) >= 6,
    "a_before_b": lambda x: x.index(A) < x.index(B),
    "high_majority": lambda x: sum(s in HIGH for s in x) > LENGTH / 2,
    "front_heavy": lambda x: sum(s in HIGH for s in x[:6]) > sum(s in HIGH for s in x[6:]),
}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("examples-cache")
    return cache, build_examples(cache, tasks=SUBSET, progress=False)


def snapshot(folder):
    return {
        str(f.relative_to(folder)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def test_oracles_cover_all_tasks():
    assert LENGTH == 12 and list(ORACLES) == list(TASKS) and len(TASKS) >= 6


@pytest.mark.parametrize("task", TASKS)
def test_data_is_labelled_right_balanced_and_deterministic(task):
    x, y = dataset(task, 400, split="train")
    assert x.shape == (400, LENGTH + 1) and (x[:, -1] == examples.CLS).all()
    assert (x != examples.PAD).all() and (x < examples.VOCAB).all()
    assert y.sum().item() == 200
    assert [bool(ORACLES[task](row[:-1])) for row in x.tolist()] == y.bool().tolist()
    x2, y2 = dataset(task, 400, split="train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, dataset(task, 400, split="eval")[0])


def test_layout_and_peft_loading(built):
    _, ex = built
    assert list(ex.adapters) == list(SUBSET)
    for task, adapter_dir in ex.adapters.items():
        assert adapter_dir.name == task
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["r"] == 8
        assert config["base_model_name_or_path"] == str(ex.base_dir)
        weights = load_file(adapter_dir / "adapter_model.safetensors")
        assert any(k.endswith("score.weight") for k in weights), "classifier head not saved"
        lora_b = [v for k, v in weights.items() if "lora_B" in k]
        assert len(lora_b) == 7 * 2  # 7 target modules in 2 layers
        assert all(v.abs().sum() > 0 for v in lora_b), "some LoRA module was not trained"
        base = AutoModelForSequenceClassification.from_pretrained(ex.base_dir)
        model = PeftModel.from_pretrained(base, adapter_dir)
        assert model.active_peft_config.r == 8


@pytest.mark.parametrize("task", SUBSET)
def test_adapters_solve_their_task_and_need_their_lora(built, task):
    _, ex = built
    full = evaluate(ex.base_dir, ex.adapters[task], task)
    head_only = evaluate(ex.base_dir, ex.adapters[task], task, head_only=True)
    assert full >= 0.95, f"{task}: accuracy {full:.3f}"
    assert head_only <= full - 0.25, f"{task}: head alone already reaches {head_only:.3f}"
    assert evaluate(ex.base_dir, ex.adapters[task], task) == full


def test_second_build_comes_from_cache(built, monkeypatch):
    cache, ex = built
    before = snapshot(cache)
    monkeypatch.setattr(examples, "_train_all", lambda *a, **k: pytest.fail("retrained a cached spec"))
    start = time.perf_counter()
    assert build_examples(cache, tasks=SUBSET, progress=False) == ex
    monkeypatch.setenv("RMM_CACHE_DIR", str(cache))
    assert build_examples(tasks=SUBSET, progress=False) == ex
    assert time.perf_counter() - start < 5
    assert snapshot(cache) == before


def test_same_spec_same_adapters_and_spec_changes_the_key(built, tmp_path, monkeypatch):
    monkeypatch.setitem(examples.TRAIN, "steps", 20)  # a changed spec, cheap to train
    monkeypatch.delenv("RMM_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    one = build_examples(tasks=["majority"], progress=False)
    two = build_examples(tmp_path / "other", tasks=["majority"], progress=False)
    assert one.base_dir.is_relative_to(tmp_path / ".cache" / "examples")
    assert one.base_dir.parent.name == two.base_dir.parent.name != built[1].base_dir.parent.name
    for a, b in [(one.base_dir, two.base_dir), (one.adapters["majority"], two.adapters["majority"])]:
        weights = "model.safetensors" if a == one.base_dir else "adapter_model.safetensors"
        assert (a / weights).read_bytes() == (b / weights).read_bytes()


def test_fresh_builds_are_identical_whatever_kernels_and_threads_the_caller_has(tmp_path):
    """Two builds, each from its own fresh process: one as this machine sets torch up, one with the kernels
    another CPU would get (AVX2 in torch and MKL) and two OpenMP threads. Same bytes, base and adapter."""
    code = (
        "import sys; from rmm import examples; examples.TRAIN['steps'] = 20; "
        "examples.build_examples(sys.argv[1], tasks=['majority'], progress=False)"
    )
    other = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "2"}
    built = []
    for name, env in (("here", {}), ("other", other)):
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / name)], env=os.environ | env, check=True, timeout=300
        )
        (key,) = (tmp_path / name).iterdir()
        built.append({f.relative_to(key): f.read_bytes() for f in key.rglob("*.safetensors")})
    assert built[0].keys() == built[1].keys() and len(built[0]) == 2
    assert built[0] == built[1]


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(examples, "_train_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_examples(tmp_path, tasks=["contains"], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tasks"):
        build_examples(tmp_path, tasks=["no_such_task"], progress=False)
