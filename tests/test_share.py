"""SHARE (PyPI `lorashare`) as a reversible baseline: exact at full components, storage counted from its tensors."""

import json
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import file_deltas, load_base, make_adapter
from rmm.baselines import run
from rmm.errors import RMMError

torch.set_num_threads(1)
TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
T, R, HIDDEN = 4, 4, 32  # q_proj and o_proj of the tiny Llama are 32 x 32: 32 components span every side


@pytest.fixture(scope="module")
def heads(llama_base, tmp_path_factory):
    """Four rank-4 adapters, each with its own trained head (`modules_to_save`), sharing some structure."""
    root = tmp_path_factory.mktemp("share_in")
    return [
        make_adapter(
            llama_base,
            root / f"task{t}",
            seed=60 + t,
            shared=0.5,
            r=R,
            target_modules=["q_proj", "o_proj"],
            modules_to_save=["lm_head"],
        )
        for t in range(T)
    ]


def saved_numbers(checkpoint) -> int:
    """Numbers in lorashare's saved checkpoint: shared components and every adapter's loadings (heads apart)."""
    files = [checkpoint / "shared_components.safetensors", *sorted(checkpoint.glob("adapters/*/loadings.safetensors"))]
    assert len(files) == 1 + T
    return sum(t.numel() for f in files for t in load_file(f).values())


def logits(base, adapter_dir):
    with torch.no_grad():
        return PeftModel.from_pretrained(load_base(base), adapter_dir).eval()(TOKENS).logits


def test_share_with_every_component_is_exact_and_keeps_each_head(heads, llama_base, tmp_path):
    summary = run("share", heads, tmp_path, components=HIDDEN)
    assert json.loads((tmp_path / "share" / "share_config.json").read_text())["num_components"] == HIDDEN
    assert summary["numbers_stored"] == saved_numbers(tmp_path / "share")
    assert summary["tasks"] == [d.name for d in heads] and max(summary["errors"].values()) < 1e-5
    for d in heads:
        got, want = file_deltas(tmp_path / d.name), file_deltas(d)
        assert got.keys() == want.keys()
        for m in want:
            assert torch.allclose(got[m], want[m], rtol=0, atol=1e-5 * want[m].abs().max()), m
        original = load_file(d / "adapter_model.safetensors")
        kept = load_file(tmp_path / d.name / "adapter_model.safetensors")
        extras = {k for k in original if "lora_" not in k}
        assert extras and all(torch.equal(kept[k], original[k]) for k in extras)  # the task's own head
    rebuilt, original = logits(llama_base, tmp_path / heads[1].name), logits(llama_base, heads[1])
    torch.testing.assert_close(rebuilt, original, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_share_takes_the_most_components_its_counted_storage_fits(heads, tmp_path, ratio):
    summary = run("share", heads, tmp_path, storage_ratio=ratio)
    k = json.loads((tmp_path / "share" / "share_config.json").read_text())["num_components"]
    stored = saved_numbers(tmp_path / "share")
    assert summary["numbers_stored"] == stored and summary["storage_ratio"] == stored / summary["numbers_original"]
    budget = ratio * summary["numbers_original"]
    assert 1 <= k < HIDDEN and stored <= budget < stored * (k + 1) / k  # one more component would not fit
    assert 0 < min(summary["errors"].values())
    for d in heads:  # lossy, but a loadable adapter with the task's config
        assert json.loads((tmp_path / d.name / "adapter_config.json").read_text()) == json.loads(
            (d / "adapter_config.json").read_text()
        )


def test_share_refusals_are_one_line(llama_base, heads, tmp_path, monkeypatch):
    other = make_adapter(llama_base, tmp_path / "in" / "r2", seed=70, r=2, target_modules=["q_proj", "o_proj"])
    cases = [
        ([*heads, other], {}, r"SHARE \(lorashare\) needs adapters of one rank: .*r=4.*r=2"),
        (heads, {"storage_ratio": 0.001}, "below one SHARE component"),
        (heads, {"components": 2, "storage_ratio": 0.5}, "not both"),
    ]
    for i, (dirs, params, match) in enumerate(cases):
        with pytest.raises(RMMError, match=match) as e:
            run("share", dirs, tmp_path / f"out{i}", **params)
        assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "lorashare", None)  # as if it were not installed
    with pytest.raises(RMMError, match="pip install lorashare"):
        run("share", heads, tmp_path / "missing")
