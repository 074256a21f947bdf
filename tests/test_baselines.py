"""Merging baselines (rmm.baselines): identities, agreement with PEFT, truncation, reversibility."""

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.merge_utils import ties

from conftest import load_base, make_adapter
from rmm.adapter import delta_weight, open_adapter
from rmm.baselines import METHODS, SINGLE_DIR, run
from rmm.bundle import read_manifest
from rmm.errors import RMMError

torch.set_num_threads(1)
TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
SINGLE = [n for n, m in METHODS.items() if m.kind == "single"]


def deltas(adapter_dir) -> dict[str, torch.Tensor]:
    a = open_adapter(adapter_dir)
    return {m: delta_weight(*a.load_factors(m)) for m in a.modules}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_dw(got: dict, want: dict, tol=1e-5):
    assert got.keys() == want.keys()
    for m in want:
        assert rel(got[m], want[m]) < tol, m


def finite_logits(base, adapter_dir):
    model = PeftModel.from_pretrained(load_base(base), adapter_dir).eval()
    with torch.no_grad():
        out = model(TOKENS).logits
    assert torch.isfinite(out).all()
    return out


def test_registry_lists_every_method():
    assert set(SINGLE) == {
        "ta-factors",
        "ties-factors",
        "dare-factors",
        "ta-dw",
        "ties-dw",
        "dare-dw",
        "core-space-ta",
        "core-space-ties",
        "lore",
    }
    assert {n for n, m in METHODS.items() if m.kind == "reversible"} == {
        "truncate",
        "rmm-paper",
        "rmm-canonical",
        "joint",
        "auto",
        "share",
    }
    assert all(m.description for m in METHODS.values())


def test_refusals(adapters, tmp_path):
    with pytest.raises(RMMError, match="unknown method"):
        run("nope", adapters, tmp_path / "a")
    with pytest.raises(RMMError, match="no parameter"):
        run("ta-dw", adapters, tmp_path / "b", density=0.5)
    with pytest.raises(RMMError, match="weights given"):
        run("ta-dw", adapters, tmp_path / "c", weights=[1.0])
    with pytest.raises(RMMError, match="density"):
        run("ties-dw", adapters, tmp_path / "d", density=0.0)
    (tmp_path / "not_adapter").mkdir()
    with pytest.raises(RMMError, match="adapter_config"):
        run("ta-dw", [tmp_path / "not_adapter"], tmp_path / "e")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(RMMError, match="not empty"):
        run("ta-dw", adapters, tmp_path / "full")


IDENTITY = {
    "ta-factors": {},
    "ties-factors": {"density": 1.0},
    "dare-factors": {"density": 1.0},
    "ta-dw": {},
    "ties-dw": {"density": 1.0},
    "dare-dw": {"density": 1.0},
    "core-space-ta": {},
    "core-space-ties": {"density": 1.0},
    "lore": {"tau": 0.0},
}


@pytest.mark.parametrize("name", SINGLE)
def test_one_adapter_with_weight_one_is_itself(adapters, llama_base, tmp_path, name):
    summary = run(name, adapters[:1], tmp_path, scale=1.0, **IDENTITY[name])
    out = tmp_path / SINGLE_DIR
    assert_same_dw(deltas(out), deltas(adapters[0]))
    assert open_adapter(out).config["r"] == 4  # default output rank is the inputs' rank
    assert summary["numbers_stored"] == summary["numbers_original"] and summary["storage_ratio"] == 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == name
    torch.testing.assert_close(
        finite_logits(llama_base, out), finite_logits(llama_base, adapters[0]), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", SINGLE)
def test_every_single_method_merges_five_into_a_loadable_adapter(adapters, llama_base, tmp_path, name):
    summary = run(name, adapters, tmp_path)
    assert summary["tasks"] == [a.name for a in adapters]
    assert summary["storage_ratio"] == pytest.approx(1 / len(adapters))  # one rank-4 adapter out of five
    finite_logits(llama_base, tmp_path / SINGLE_DIR)


def test_core_space_ta_equals_dense_ta_and_the_weighted_sum(adapters, tmp_path):
    w = [0.5, -0.25, 1.0, 0.3, 0.2]
    run("core-space-ta", adapters, tmp_path / "core", weights=w, rank="full")
    run("ta-dw", adapters, tmp_path / "dense", weights=w, rank="full")
    core, dense = deltas(tmp_path / "core" / SINGLE_DIR), deltas(tmp_path / "dense" / SINGLE_DIR)
    ins = [deltas(a) for a in adapters]
    want = {m: sum(wt * d[m] for wt, d in zip(w, ins)) for m in ins[0]}
    assert_same_dw(dense, want)
    assert_same_dw(core, want)
    # At rank r both are the best rank-r approximation of the same matrix.
    run("core-space-ta", adapters, tmp_path / "core4", weights=w)
    run("ta-dw", adapters, tmp_path / "dense4", weights=w)
    assert_same_dw(deltas(tmp_path / "core4" / SINGLE_DIR), deltas(tmp_path / "dense4" / SINGLE_DIR))


def test_lore_with_tau_zero_is_task_arithmetic_and_tau_shrinks_towards_the_shared_part(adapters, tmp_path):
    run("lore", adapters, tmp_path / "l0", tau=0.0, rank="full")
    run("ta-dw", adapters, tmp_path / "ta", rank="full")
    assert_same_dw(deltas(tmp_path / "l0" / SINGLE_DIR), deltas(tmp_path / "ta" / SINGLE_DIR))
    run("lore", adapters, tmp_path / "l1", tau=0.3, rank="full")
    d1, d0 = deltas(tmp_path / "l1" / SINGLE_DIR), deltas(tmp_path / "ta" / SINGLE_DIR)
    assert any(rel(d1[m], d0[m]) > 1e-3 for m in d0)


def test_dare_with_density_one_is_task_arithmetic_and_is_seeded(adapters, tmp_path):
    for where in ("factors", "dw"):
        run(f"dare-{where}", adapters, tmp_path / f"dare1-{where}", density=1.0)
        run(f"ta-{where}", adapters, tmp_path / f"ta-{where}")
        assert_same_dw(deltas(tmp_path / f"dare1-{where}" / SINGLE_DIR), deltas(tmp_path / f"ta-{where}" / SINGLE_DIR))
    state = torch.get_rng_state()
    run("dare-dw", adapters, tmp_path / "s0a", density=0.5, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    run("dare-dw", adapters, tmp_path / "s0b", density=0.5, seed=0)
    run("dare-dw", adapters, tmp_path / "s1", density=0.5, seed=1)
    a, b, c = (deltas(tmp_path / d / SINGLE_DIR) for d in ("s0a", "s0b", "s1"))
    assert_same_dw(a, b, tol=1e-12)
    assert all(rel(c[m], a[m]) > 1e-3 for m in a)


def test_ties_dw_is_peft_ties_on_dw(adapters, tmp_path):
    run("ties-dw", adapters, tmp_path, density=0.3, rank="full")
    ins = [deltas(a) for a in adapters]
    w = torch.ones(len(adapters), dtype=torch.float64)
    want = {m: ties([d[m] for d in ins], w, 0.3) for m in ins[0]}
    got = deltas(tmp_path / SINGLE_DIR)
    assert_same_dw(got, want)
    # trimming keeps 30% per task, so the merged update differs from the plain sum's direction
    assert all(rel(got[m], sum(d[m] for d in ins)) > 1e-2 for m in want)


@pytest.mark.parametrize(
    ("name", "peft_type", "params"),
    [("ta-factors", "linear", {}), ("ties-factors", "ties", {"density": 0.5}), ("ta-dw", "svd", {})],
)
def test_agrees_with_peft_add_weighted_adapter(adapters, llama_base, tmp_path, name, peft_type, params):
    w = [0.6, 0.3, 0.4, 0.2, 0.5]
    run(name, adapters, tmp_path, weights=w, **params)
    model = PeftModel.from_pretrained(load_base(llama_base), adapters[0], adapter_name="t0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(a, adapter_name=f"t{i}")
    model.add_weighted_adapter(
        [f"t{i}" for i in range(len(adapters))],
        w,
        "merged",
        combination_type=peft_type,
        density=params.get("density"),
        svd_rank=4,
    )
    ours = deltas(tmp_path / SINGLE_DIR)
    theirs = {n: m.get_delta_weight("merged").double() for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert_same_dw(ours, theirs)  # PeftModel's module names carry the same "base_model.model." prefix


def test_truncate_full_rank_is_exact_and_below_it_loses_the_discarded_singular_values(adapters, llama_base, tmp_path):
    full = run("truncate", adapters, tmp_path / "full", rank=4)
    assert full["storage_ratio"] == 1.0 and max(full["errors"].values()) < 1e-6
    for a in adapters:
        assert_same_dw(deltas(tmp_path / "full" / a.name), deltas(a))
    half = run("truncate", adapters, tmp_path / "half", storage_ratio=0.5)
    assert half["params"] == {"rank": None, "storage_ratio": 0.5}
    spec = open_adapter(adapters[0]).modules
    assert half["numbers_stored"] == len(adapters) * sum(2 * (s.out_features + s.in_features) for s in spec.values())
    assert half["storage_ratio"] == pytest.approx(0.5)
    for a in adapters:
        got, want = deltas(tmp_path / "half" / a.name), deltas(a)
        assert open_adapter(tmp_path / "half" / a.name).config["r"] == 2
        for m in want:
            S = torch.linalg.svdvals(want[m])
            expected = (S[2:].square().sum() / S.square().sum()).sqrt().item()
            assert rel(got[m], want[m]) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    finite_logits(llama_base, tmp_path / "half" / adapters[0].name)


@pytest.mark.parametrize("name", ["rmm-paper", "rmm-canonical"])
def test_rmm_at_full_basis_reverts_exactly(adapters, llama_base, tmp_path, name):
    summary = run(name, adapters, tmp_path, basis_size=16)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert summary["numbers_stored"] == manifest["report"]["storage"]["numbers_stored"]
    assert summary["storage_ratio"] == pytest.approx(manifest["report"]["storage"]["ratio"])
    assert max(summary["errors"].values()) < 1e-5
    for a in adapters:
        assert_same_dw(deltas(tmp_path / a.name), deltas(a))
    torch.testing.assert_close(
        finite_logits(llama_base, tmp_path / adapters[1].name),
        finite_logits(llama_base, adapters[1]),
        rtol=1e-5,
        atol=1e-5,
    )
    lossy = run(name, adapters, tmp_path / "lossy", storage_ratio=0.5)
    assert lossy["storage_ratio"] <= 0.5 and max(lossy["errors"].values()) > 1e-3


def test_mixed_ranks_rslora_and_patterns(llama_base, tmp_path):
    from conftest import make_adapter

    a = make_adapter(llama_base, tmp_path / "in" / "a", seed=10, r=2, lora_alpha=4, use_rslora=True)
    b = make_adapter(
        llama_base, tmp_path / "in" / "b", seed=11, r=4, rank_pattern={"v_proj": 3}, alpha_pattern={"v_proj": 5}
    )
    w = [0.7, 0.4]
    want = {m: w[0] * da + w[1] * deltas(b)[m] for m, da in deltas(a).items()}
    for name in ("ta-dw", "core-space-ta"):
        run(name, [a, b], tmp_path / name, weights=w, rank="full")
        assert_same_dw(deltas(tmp_path / name / SINGLE_DIR), want)
    summary = run("truncate", [a, b], tmp_path / "trunc", storage_ratio=1.0)
    assert summary["storage_ratio"] == 1.0
    for d in (a, b):
        assert_same_dw(deltas(tmp_path / "trunc" / d.name), deltas(d))
    finite_logits(llama_base, tmp_path / "trunc" / "b")


@pytest.mark.parametrize("name", ["ties-factors", "ties-dw", "core-space-ties", "lore"])
def test_conv1d_gpt2_adapters(gpt2_base, tmp_path, name):
    from conftest import make_adapter

    ins = [
        make_adapter(
            gpt2_base, tmp_path / "in" / f"g{t}", seed=t, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
        )
        for t in range(3)
    ]
    run(name, ins, tmp_path / "out")
    finite_logits(gpt2_base, tmp_path / "out" / SINGLE_DIR)


def test_joint_subspace_is_exact_at_full_rank_and_counts_its_storage(adapters, llama_base, tmp_path):
    full = run("joint", adapters, tmp_path / "full", rank=10_000)  # K capped per side at min(size, T r)
    assert max(full["errors"].values()) < 1e-6
    for a in adapters:
        assert_same_dw(deltas(tmp_path / "full" / a.name), deltas(a))
    small = run("joint", adapters, tmp_path / "small", rank=3)
    spec = open_adapter(adapters[0]).modules
    T = len(adapters)
    assert small["numbers_stored"] == sum(
        3 * (s.out_features + s.in_features) + T * 9 for s in spec.values()
    )  # 3 < every side
    half = run("joint", adapters, tmp_path / "half", storage_ratio=0.5)
    assert half["storage_ratio"] <= 0.5 and 0 < max(half["errors"].values()) < 1
    for a in adapters:  # the reported error is the written adapter's
        got, want = deltas(tmp_path / "half" / a.name), deltas(a)
        errs = [rel(got[m], want[m]) for m in want]
        assert sum(errs) / len(errs) == pytest.approx(half["errors"][a.name], rel=1e-5, abs=1e-8)
    finite_logits(llama_base, tmp_path / "half" / adapters[0].name)


def _squared_errors(out, adapters):
    """What the allocator minimises: sum over tasks and modules of (out + in) x relative squared dW error."""
    total = 0.0
    for a in adapters:
        got, want = deltas(out / a.name), deltas(a)
        total += sum(sum(want[m].shape) * rel(got[m], want[m]) ** 2 for m in want)
    return total


def test_auto_is_exact_at_full_budget_and_never_worse_than_truncation_joint_or_the_paper(llama_base, tmp_path):
    shared = [make_adapter(llama_base, tmp_path / "in" / f"s{i}", seed=40 + i, shared=0.6) for i in range(6)]
    full = run("auto", shared, tmp_path / "full", storage_ratio=1.0)
    assert full["storage_ratio"] <= 1.0 and _squared_errors(tmp_path / "full", shared) < 1e-10
    for ratio in (0.25, 0.5):
        auto = run("auto", shared, tmp_path / f"auto{ratio}", storage_ratio=ratio)
        assert auto["storage_ratio"] <= ratio + 1e-9
        mine = _squared_errors(tmp_path / f"auto{ratio}", shared)
        for other in ("truncate", "joint", "rmm-paper"):
            summary = run(other, shared, tmp_path / f"{other}{ratio}", storage_ratio=ratio)
            assert summary["storage_ratio"] <= ratio + 1e-9
            assert mine <= _squared_errors(tmp_path / f"{other}{ratio}", shared) * (1 + 1e-6), (
                other,
                ratio,
            )  # float32 storage
        assert {m.method for m in read_manifest(tmp_path / f"auto{ratio}" / "bundle").modules} <= {
            "truncate",
            "joint",
            "shared",
        }


def test_auto_with_calibration_reverts_the_plan_whose_output_divergence_it_records(adapters, llama_base, tmp_path):
    """`auto` passes base + calibration to rmm merge: each reverted adapter's mean KL from the original's next-token
    distribution on the examples, measured here with PEFT, is what the report says the chosen plan costs it."""
    data = tmp_path / "calibration"
    data.mkdir()
    examples = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(1))
    (data / "default.jsonl").write_text("".join(json.dumps({"input_ids": x}) + "\n" for x in examples.tolist()))
    summary = run(
        "auto", adapters, tmp_path / "out", storage_ratio=0.3, base=str(llama_base), calibration=str(data),
        calibration_examples=4,
    )  # fmt: skip
    assert summary["params"]["calibration_examples"] == 4 and summary["storage_ratio"] <= 0.3 + 1e-9
    report = read_manifest(tmp_path / "out" / "bundle").report.calibration
    assert report.examples == 4 and len(report.candidates) > 1
    for a in adapters:
        logp = [
            torch.log_softmax(PeftModel.from_pretrained(load_base(llama_base), d).eval()(examples[:4]).logits, -1)
            for d in (a, tmp_path / "out" / a.name)
        ]
        kl = (logp[0].exp() * (logp[0] - logp[1])).sum(-1).mean().item()
        assert kl == pytest.approx(report.candidates[report.chosen].divergence[a.name], rel=1e-3, abs=1e-7)
    with pytest.raises(RMMError, match="both"):
        run("auto", adapters, tmp_path / "half", storage_ratio=0.3, base=str(llama_base))
