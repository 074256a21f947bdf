"""merge -> bundle -> revert through real PEFT directories, checked on dW and on model outputs."""

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from conftest import load_base, make_adapter
from rmm.adapter import delta_weight, open_adapter
from rmm.bundle import BASIS_FILE, MergeOptions, coefficients_file, read_manifest
from rmm.io import open_safetensors
from rmm.merge import merge, revert
from rmm.solver import reconstruct, storage_ratio
from rmm.summary import inspect_bundle


def peft_deltas(base, adapter_dir) -> dict[str, torch.Tensor]:
    """dW per module as PEFT itself computes it (scaling, rslora, patterns, fan_in_fan_out)."""
    model = PeftModel.from_pretrained(load_base(base), adapter_dir)
    return {n: m.get_delta_weight("default").double() for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def logits(base, adapter_dir, tokens) -> torch.Tensor:
    model = PeftModel.from_pretrained(load_base(base), adapter_dir).eval()
    with torch.no_grad():
        return model(tokens).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("canonical", [False, True])
def test_full_basis_reverts_exactly(adapters, llama_base, tmp_path, canonical):
    manifest = merge(adapters, tmp_path / "bundle", MergeOptions(basis_size=16, canonicalize=canonical), progress=False)
    assert {m.p for m in manifest.modules} == {4}  # min(r, T - 1)
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    for a in adapters:
        want, got = peft_deltas(llama_base, a), peft_deltas(llama_base, tmp_path / "rev" / a.name)
        assert want.keys() == got.keys()
        for name in want:
            assert rel(got[name], want[name]) < 1e-5, name
        assert max(manifest.report.errors[a.name].values()) < 1e-5
    torch.testing.assert_close(
        logits(llama_base, tmp_path / "rev" / "task2", TOKENS),
        logits(llama_base, adapters[2], TOKENS),
        rtol=1e-5,
        atol=1e-5,
    )


def test_reverted_adapter_gives_what_mu_plus_U_c_predicts(adapters, llama_base, tmp_path):
    bundle = tmp_path / "bundle"
    manifest = merge(adapters, bundle, MergeOptions(basis_size=2), progress=False)
    revert(bundle, tmp_path / "rev", ["task3"], progress=False)
    assert [p.name for p in (tmp_path / "rev").iterdir()] == ["task3"]
    # Build the prediction from the bundle's tensors by hand: W + (mu_B + U_B c_B)(mu_A + U_A c_A)^T.
    model = load_base(llama_base)
    weights = dict(model.named_parameters())
    with open_safetensors(bundle / BASIS_FILE) as f, open_safetensors(coefficients_file(bundle, "task3")) as c:
        for mod in manifest.modules:
            X = {
                k: reconstruct(
                    f.get_tensor(f"{mod.name}.{k}.mean").double(),
                    f.get_tensor(f"{mod.name}.{k}.basis").double(),
                    c.get_tensor(f"{mod.name}.{k}").double(),
                )
                for k in "BA"
            }
            w = weights[mod.name.removeprefix("base_model.model.") + ".weight"]
            with torch.no_grad():
                w += (X["B"] @ X["A"].T).float()
    with torch.no_grad():
        predicted = model(TOKENS).logits
    torch.testing.assert_close(logits(llama_base, tmp_path / "rev" / "task3", TOKENS), predicted, rtol=1e-4, atol=1e-5)
    # And the reported error is the error of exactly that reverted adapter.
    original, reverted = peft_deltas(llama_base, adapters[3]), peft_deltas(llama_base, tmp_path / "rev" / "task3")
    for name, err in manifest.report.errors["task3"].items():
        assert rel(reverted[name], original[name]) == pytest.approx(err, rel=1e-4, abs=1e-6)
    assert 0.05 < max(manifest.report.errors["task3"].values()) < 1  # lossy at p = 2, not garbage


SCALING_RULES = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "rank_pattern_regex": dict(r=4, lora_alpha=8, rank_pattern={r"layers\.1\..*q_proj": 2, "down_proj": 6}),
    "alpha_pattern": dict(r=4, lora_alpha=8, alpha_pattern={"model.layers.0.self_attn.v_proj": 32, "q_proj": 3}),
}


@pytest.mark.parametrize("rule", SCALING_RULES)
def test_scaling_rules_are_folded_as_peft_computes_dW(llama_base, tmp_path, rule):
    path = make_adapter(llama_base, tmp_path / rule, seed=7, **SCALING_RULES[rule])
    adapter = open_adapter(path)
    want = peft_deltas(llama_base, path)
    assert want.keys() == adapter.modules.keys()
    for name, dW in want.items():
        B, A = adapter.load_factors(name)
        torch.testing.assert_close(delta_weight(B, A), dW, rtol=1e-6, atol=1e-7)


def test_fan_in_fan_out_conv1d(gpt2_base, tmp_path):
    lora = dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    paths = [make_adapter(gpt2_base, tmp_path / f"g{t}", seed=t, **lora) for t in range(3)]
    for name, dW in peft_deltas(gpt2_base, paths[0]).items():
        B, A = open_adapter(paths[0]).load_factors(name)
        torch.testing.assert_close(delta_weight(B, A, fan_in_fan_out=True), dW, rtol=1e-6, atol=1e-7)
    merge(paths, tmp_path / "bundle", MergeOptions(basis_size=4), progress=False)
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    assert json.loads((tmp_path / "rev" / "g1" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.testing.assert_close(
        logits(gpt2_base, tmp_path / "rev" / "g1", TOKENS), logits(gpt2_base, paths[1], TOKENS), rtol=1e-5, atol=1e-5
    )


def test_heterogeneous_ranks_and_rules_revert_exactly(llama_base, tmp_path):
    rules = [
        dict(r=2, lora_alpha=16),
        dict(r=8, lora_alpha=8),
        dict(r=4, lora_alpha=4, use_rslora=True),
        SCALING_RULES["rank_pattern_regex"],
    ]
    paths = [make_adapter(llama_base, tmp_path / f"h{i}", seed=i, **rule) for i, rule in enumerate(rules)]
    manifest = merge(paths, tmp_path / "bundle", MergeOptions(basis_size=8), progress=False)
    assert {m.rank for m in manifest.modules} == {8}
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    for p in paths:
        config = json.loads((tmp_path / "rev" / p.name / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == 8 and not config["rank_pattern"] and not config["use_rslora"]
        want, got = peft_deltas(llama_base, p), peft_deltas(llama_base, tmp_path / "rev" / p.name)
        for name in want:
            assert rel(got[name], want[name]) < 1e-5, (p.name, name)
    # Storage counts the originals at their own ranks, not padded: every LoRA number in the files.
    lora_numbers = 0
    for p in paths:
        with open_safetensors(p / "adapter_model.safetensors") as f:
            lora_numbers += sum(
                f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys() if ".lora_" in k
            )
    assert manifest.report.storage.numbers_original == lora_numbers


def test_modules_to_save_are_carried_through_untouched(llama_base, tmp_path):
    paths = [make_adapter(llama_base, tmp_path / f"m{t}", seed=t, modules_to_save=["lm_head"]) for t in range(3)]
    with torch.no_grad():  # give each task its own head, as a fine-tune would
        for t, p in enumerate(paths):
            model = PeftModel.from_pretrained(load_base(llama_base), p, is_trainable=True)
            for n, w in model.named_parameters():
                if "modules_to_save" in n:
                    w.add_(t + 1.0)
            model.save_pretrained(p)
    manifest = merge(paths, tmp_path / "bundle", MergeOptions(basis_size=2), progress=False)
    assert manifest.tasks[0].extras
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    for p in paths:
        with (
            open_safetensors(p / "adapter_model.safetensors") as a,
            open_safetensors(tmp_path / "rev" / p.name / "adapter_model.safetensors") as b,
        ):
            for key in manifest.tasks[0].extras:
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    torch.testing.assert_close(
        logits(llama_base, tmp_path / "rev" / "m1", TOKENS), logits(llama_base, paths[1], TOKENS), rtol=1e-5, atol=1e-5
    )


def test_storage_ratio_agrees_with_bytes_on_disk(adapters, tmp_path):
    manifest = merge(adapters, tmp_path / "bundle", MergeOptions(method="rmm-paper", storage_ratio=0.9), progress=False)
    r, T = 4, len(adapters)
    (p,) = {m.p for m in manifest.modules}
    assert storage_ratio(r, T, p) <= 0.9 < storage_ratio(r, T, p + 1)
    s = manifest.report.storage
    assert s.ratio == pytest.approx(storage_ratio(r, T, p), rel=1e-12)
    tensor_bytes = 0
    files = [tmp_path / "bundle" / BASIS_FILE] + [coefficients_file(tmp_path / "bundle", a.name) for a in adapters]
    for file in files:
        with open_safetensors(file) as f:
            tensor_bytes += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    original_bytes = sum((open_adapter(a).weights_file.stat().st_size) for a in adapters)
    assert tensor_bytes == s.bytes_stored == pytest.approx(storage_ratio(r, T, p) * s.bytes_original, rel=1e-12)
    # Files add only their headers on top of the tensor bytes.
    assert 0 < sum(f.stat().st_size for f in files) - tensor_bytes < 64 * 1024
    assert s.bytes_original < original_bytes  # the inputs' files hold headers too


def test_reverting_one_task_needs_only_its_own_files(adapters, tmp_path):
    bundle = tmp_path / "bundle"
    merge(adapters, bundle, MergeOptions(basis_size=4), progress=False)
    for a in adapters[1:]:
        coefficients_file(bundle, a.name).unlink()
    revert(bundle, tmp_path / "rev", ["task0"], progress=False)
    assert (tmp_path / "rev" / "task0" / "adapter_model.safetensors").is_file()


def test_manifest_records_inputs_and_options(adapters, tmp_path):
    merge(adapters, tmp_path / "bundle", MergeOptions(storage_ratio=0.6, canonicalize=True), progress=False)
    m = read_manifest(tmp_path / "bundle")
    assert m.options.storage_ratio == 0.6 and m.options.canonicalize
    assert [t.name for t in m.tasks] == [a.name for a in adapters]
    assert all(len(t.sha256) == 64 for t in m.tasks) and len({t.sha256 for t in m.tasks}) == len(adapters)
    assert m.tool_version and m.storage_dtype == "float32"
    assert set(m.report.seconds) == {"open", "solve", "write"}


def test_bundle_from_a_given_basis_matches_the_full_merge(adapters, tmp_path):
    """A site's bundle (its tasks' coefficients against a basis solved elsewhere) is the full one's."""
    full = merge(adapters, tmp_path / "full", MergeOptions(basis_size=2, canonicalize=True), progress=False)
    part = merge(
        adapters[1:3],
        tmp_path / "part",
        MergeOptions(canonicalize=True),
        basis=tmp_path / "full" / BASIS_FILE,
        progress=False,
    )
    assert [m.p for m in part.modules] == [m.p for m in full.modules]
    assert full.basis_sha256 is None and len(part.basis_sha256) == 64
    for a in adapters[1:3]:
        with (
            open_safetensors(coefficients_file(tmp_path / "full", a.name)) as f,
            open_safetensors(coefficients_file(tmp_path / "part", a.name)) as g,
        ):
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key
        assert part.report.errors[a.name] == full.report.errors[a.name]


# --- method "auto" (the default): per module, per-task truncation or joint sharing -------------------


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_auto_reverts_what_it_reports_within_the_budget_it_counts(llama_base, tmp_path, ratio):
    """Mixed ranks and scaling rules, some tasks sharing structure: what is stored fits the budget (counted
    in the files, equal to the formula), and every reverted dW has exactly the error the report states."""
    rules = [
        dict(r=2, lora_alpha=16),
        dict(r=8, lora_alpha=8),
        dict(r=4, lora_alpha=4, use_rslora=True),
        dict(r=4),
        dict(r=4),
    ]
    paths = [
        make_adapter(llama_base, tmp_path / f"h{i}", seed=i, shared=0.7 if i > 2 else 0.0, **rule)
        for i, rule in enumerate(rules)
    ]
    manifest = merge(paths, tmp_path / "bundle", MergeOptions(storage_ratio=ratio), progress=False)
    assert manifest.options.method == "auto" and {m.method for m in manifest.modules} <= {"truncate", "joint", "shared"}
    storage = manifest.report.storage
    assert storage.ratio <= ratio
    summary = inspect_bundle(tmp_path / "bundle")
    assert summary["storage"]["ratio_formula"] == pytest.approx(storage.ratio)
    with open_safetensors(tmp_path / "bundle" / BASIS_FILE) as f:
        counted = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    for p in paths:
        with open_safetensors(coefficients_file(tmp_path / "bundle", p.name)) as f:
            counted += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert counted == storage.numbers_stored
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    for p in paths:
        want, got = peft_deltas(llama_base, p), peft_deltas(llama_base, tmp_path / "rev" / p.name)
        for name in want:
            assert rel(got[name], want[name]) == pytest.approx(
                manifest.report.errors[p.name][name], rel=1e-4, abs=1e-6
            ), (p.name, name)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_auto_at_full_storage_reverts_exactly_and_is_the_default(adapters, llama_base, tmp_path):
    assert MergeOptions().method == "auto" and MergeOptions().storage_ratio == 0.5
    manifest = merge(adapters, tmp_path / "bundle", MergeOptions(storage_ratio=1.0), progress=False)
    assert manifest.report.storage.ratio <= 1.0
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    for a in adapters:
        assert max(manifest.report.errors[a.name].values()) < 1e-5
    torch.testing.assert_close(
        logits(llama_base, tmp_path / "rev" / "task1", TOKENS),
        logits(llama_base, adapters[1], TOKENS),
        rtol=1e-5,
        atol=1e-5,
    )


def test_auto_shares_what_tasks_share_and_truncates_what_they_do_not(llama_base, tmp_path):
    """Tasks built on one common update (the same raw factors plus their own) share it: jointly at a
    budget that buys more than the common part, per position (the mean alone) in some modules at one
    that buys little more; unrelated tasks are truncated."""
    alike = [make_adapter(llama_base, tmp_path / "alike" / f"s{i}", seed=60 + i, shared=0.95) for i in range(8)]
    apart = [make_adapter(llama_base, tmp_path / "apart" / f"u{i}", seed=80 + i) for i in range(4)]
    joint = merge(alike, tmp_path / "b1", MergeOptions(storage_ratio=0.3), progress=False)
    assert {m.method for m in joint.modules} == {"joint"}
    means = merge(alike, tmp_path / "b2", MergeOptions(storage_ratio=0.15), progress=False)
    assert ("shared", 0) in {(m.method, m.p) for m in means.modules} and means.report.storage.ratio <= 0.15
    alone = merge(apart, tmp_path / "b3", MergeOptions(storage_ratio=0.3), progress=False)
    assert {m.method for m in alone.modules} == {"truncate"}
