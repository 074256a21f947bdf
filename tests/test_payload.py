"""Site payloads of every kind aggregate to the centralised basis; sketches below full rank are lossy."""

import pytest
import torch

from conftest import file_deltas, make_adapter
from rmm.adapter import open_adapter
from rmm.bundle import BASIS_FILE, MergeOptions
from rmm.io import open_safetensors
from rmm.merge import merge, module_specs, numbers_original, plan_modules
from rmm.errors import RMMError
from rmm.payload import (
    aggregate,
    smallest_exact_numbers,
    split_candidates,
    write_bases,
    write_candidates,
    write_curves,
    write_payload,
    write_plan,
    write_spectra,
)
from rmm.allocate import DATA_FREE
from rmm.plan import modules_of_basis


@pytest.fixture(scope="module")
def eight(llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("eight")
    return [make_adapter(llama_base, root / f"t{i}", seed=10 + i, shared=0.5, r=2 + 2 * (i % 3)) for i in range(8)]


def _basis(file):
    with open_safetensors(file) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("kind", ["moments", "sketch", "factors"])
@pytest.mark.parametrize("canonical", [False, True])
def test_sites_aggregate_to_the_centralised_basis(eight, tmp_path, kind, canonical):
    options = MergeOptions(basis_size=3, canonicalize=canonical)
    central = merge(eight, tmp_path / "central", options, progress=False)
    adapters = [open_adapter(p) for p in eight]
    modules = plan_modules(module_specs(adapters), len(adapters), numbers_original(adapters), options)
    shards = [adapters[:1], adapters[1:4], adapters[4:]]  # uneven
    files = []
    for i, shard in enumerate(shards):
        files.append(tmp_path / f"site{i}.safetensors")
        write_payload(shard, modules, files[-1], kind, q=6, canonical=canonical)  # q covers r = 6
    aggregate(files, modules, tmp_path / "basis.safetensors")
    want, got = _basis(tmp_path / "central" / BASIS_FILE), _basis(tmp_path / "basis.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    # A site's bundle against the federated basis equals the centralised bundle's coefficients.
    site = merge(
        [p for p in eight[4:]], tmp_path / "site", options, basis=tmp_path / "basis.safetensors", progress=False
    )
    for a in site.tasks:
        for name, err in site.report.errors[a.name].items():
            assert err == pytest.approx(central.report.errors[a.name][name], rel=1e-4, abs=1e-6)


def test_low_rank_sketch_is_smaller_and_lossy(eight, tmp_path):
    adapters = [open_adapter(p) for p in eight]
    modules = plan_modules(
        module_specs(adapters), len(adapters), numbers_original(adapters), MergeOptions(basis_size=3)
    )
    full = write_payload(adapters, modules, tmp_path / "full.safetensors", "sketch", q=6)
    low = write_payload(adapters, modules, tmp_path / "low.safetensors", "sketch", q=1)
    moments = write_payload(adapters, modules, tmp_path / "m.safetensors", "moments")
    assert low.numbers < full.numbers
    positions = sum(m.out_features + m.in_features for m in modules)
    assert moments.numbers == smallest_exact_numbers(positions, 6, 8)  # r (r + 3) / 2 < n r here
    aggregate([tmp_path / "full.safetensors"], modules, tmp_path / "b_full.safetensors")
    aggregate([tmp_path / "low.safetensors"], modules, tmp_path / "b_low.safetensors")
    exact, lossy = _basis(tmp_path / "b_full.safetensors"), _basis(tmp_path / "b_low.safetensors")
    differs = [
        k for k in exact if k.endswith(".basis") and not torch.allclose(exact[k].abs(), lossy[k].abs(), atol=1e-3)
    ]
    assert differs


@pytest.fixture(scope="module")
def alike(llama_base, tmp_path_factory):
    """Eight adapters that are one common update (in their raw factors) plus a little of their own."""
    root = tmp_path_factory.mktemp("alike")
    return [make_adapter(llama_base, root / f"a{i}", seed=40 + i, shared=0.95) for i in range(8)]


@pytest.mark.parametrize(
    "inputs, ratio, kinds",
    [
        ("eight", 0.3, {"joint"}),
        ("eight", 0.6, {"truncate", "joint"}),
        ("alike", 0.15, {"joint", "shared"}),
    ],
)
def test_auto_in_two_rounds_plans_and_reverts_as_the_centralised_merge(request, tmp_path, inputs, ratio, kinds):
    """Spectra -> bases -> curves -> plan over uneven sites gives the centralised plan, and each site's
    bundle against the planned basis the centralised errors; no site ever sends its factors."""
    eight = request.getfixturevalue(inputs)
    central = merge(eight, tmp_path / "central", MergeOptions(storage_ratio=ratio), progress=False)
    assert {m.method for m in central.modules} == kinds
    adapters = [open_adapter(p) for p in eight]
    modules = module_specs(adapters)
    shards = [adapters[:1], adapters[1:4], adapters[4:]]
    spectra = [tmp_path / f"s{i}.safetensors" for i in range(3)]
    for shard, file in zip(shards, spectra):
        write_spectra(shard, modules, file)
    write_bases(spectra, modules, tmp_path / "bases.safetensors")
    curves = [tmp_path / f"c{i}.safetensors" for i in range(3)]
    for shard, file in zip(reversed(shards), reversed(curves)):  # sites answer in any order
        write_curves(shard, modules, tmp_path / "bases.safetensors", file)
    planned, kept = write_plan(
        spectra,
        curves[::-1],
        modules,
        ratio * numbers_original(adapters),
        tmp_path / "bases.safetensors",
        tmp_path / "plan.safetensors",
    )
    assert [(m.method, m.ranks, m.size, m.p) for m in planned] == [
        (m.method, m.ranks, m.size, m.p) for m in central.modules
    ]
    # The share of the tasks' summed ||dW||^2 the plan keeps: from the centralised report's errors and dW computed here.
    energy = {a.name: {m: float((dW * dW).sum()) for m, dW in file_deltas(a.path).items()} for a in adapters}
    for m in central.modules:
        lost = sum(central.report.errors[t][m.name] ** 2 * energy[t][m.name] for t in energy)
        want = 1 - lost / sum(e[m.name] for e in energy.values())
        assert kept[m.name]["dW"] == pytest.approx(want, rel=1e-4, abs=1e-6), m.name
    for i, shard in enumerate(shards):
        site = merge(
            [a.path for a in shard],
            tmp_path / f"site{i}",
            MergeOptions(storage_ratio=ratio),
            basis=tmp_path / "plan.safetensors",
            progress=False,
        )
        for a in shard:
            for name, err in site.report.errors[a.name].items():
                assert err == pytest.approx(central.report.errors[a.name][name], rel=1e-4, abs=1e-6), (a.name, name)
    with pytest.raises(RMMError, match="built by method auto"):
        merge(
            [a.path for a in shards[0]],
            tmp_path / "wrong",
            MergeOptions(basis_size=2),
            basis=tmp_path / "plan.safetensors",
            progress=False,
        )


def test_every_candidate_plan_splits_into_the_basis_write_plan_writes_for_it(alike, tmp_path):
    """The candidates file of a calibrating federation: each candidate split out is a method-auto basis of its own
    plan, and the one the data-free allocator picks is, byte for byte, the basis write_plan writes."""
    adapters = [open_adapter(p) for p in alike]
    modules = module_specs(adapters)
    shards = [adapters[:3], adapters[3:]]
    spectra, curves = (
        [tmp_path / f"s{i}.safetensors" for i in range(2)],
        [tmp_path / f"c{i}.safetensors" for i in range(2)],
    )
    for shard, s in zip(shards, spectra):
        write_spectra(shard, modules, s)
    write_bases(spectra, modules, tmp_path / "bases.safetensors")
    for shard, c in zip(shards, curves):
        write_curves(shard, modules, tmp_path / "bases.safetensors", c)
    inputs = (spectra, curves, modules, 0.3 * numbers_original(adapters), tmp_path / "bases.safetensors")
    planned, kept = write_plan(*inputs, tmp_path / "plan.safetensors")
    candidates = write_candidates(*inputs, tmp_path / "candidates.safetensors")
    split = split_candidates(tmp_path / "candidates.safetensors", tmp_path / "split")
    assert list(split) == list(candidates) and len(split) >= 3
    free = min((n for n in DATA_FREE if n in candidates), key=lambda n: candidates[n]["dw_objective"])
    assert split[free].read_bytes() == (tmp_path / "plan.safetensors").read_bytes()
    assert candidates[free]["modules"] == [m.model_dump(mode="json") for m in planned]
    assert candidates[free]["energy"] == kept
    names = [a.name for a in adapters]
    for name, file in split.items():
        got = modules_of_basis(file, modules, names, "auto")
        assert [m.model_dump(mode="json") for m in got] == candidates[name]["modules"], name
    with pytest.raises(RMMError, match="not a candidates file"):
        split_candidates(tmp_path / "plan.safetensors", tmp_path / "wrong")
