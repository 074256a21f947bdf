"""Calibration in a method-auto federation: each site scores every candidate plan on its own tasks' examples and
sends only the per-candidate sums; the federation keeps the plan `rmm merge --calibration` keeps centrally."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import make_adapter
from rmm.adapter import open_adapters
from coordinator.config import CoordinatorConfig, FederationConfig, Site, token_hash
from rmm.allocate import DATA_FREE
from rmm.bundle import MergeOptions, ModuleEntry, read_manifest
from rmm.calibrate import Calibration
from rmm.cli import main
from rmm.errors import RMMError
from rmm.io import open_safetensors
from rmm.merge import revert
from rmm.payload import read_divergences
from rmm.plan import module_specs
from test_federation import _assert_same_adapters
from workers.client import Credentials
from workers.simulate import BackgroundCoordinator, simulate
from workers.site import run_site

RATIO = 0.35
EXAMPLES = 4


@pytest.fixture(scope="module")
def five(llama_base, tmp_path_factory):
    """Five related rank-4 adapters: at RATIO their outputs prefer another plan than the least dW error."""
    root = tmp_path_factory.mktemp("five")
    return [make_adapter(llama_base, root / f"t{i}", seed=70 + i, shared=0.3) for i in range(5)]


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """Random token ids: default.jsonl for every task, and t1's own examples (other lengths) in t1.jsonl."""
    data = tmp_path_factory.mktemp("calibration")
    rng = random.Random(0)

    def lines(count: int, length: int) -> str:
        return "".join(
            json.dumps({"input_ids": [rng.randrange(64) for _ in range(length)]}) + "\n" for _ in range(count)
        )

    (data / "default.jsonl").write_text(lines(EXAMPLES, 8))
    (data / "t1.jsonl").write_text(lines(3, 6) + lines(1, 5))
    return data


def test_federated_calibration_keeps_the_centralised_plan_and_only_sums_leave_a_site(
    ray_cluster, llama_base, five, examples, tmp_path
):
    central = tmp_path / "central"
    args = [*map(str, five), "--out", str(central / "bundle"), "--storage-ratio", str(RATIO)]
    assert main(["merge", *args, "--base", str(llama_base), "--calibration", str(examples)]) == 0
    want = read_manifest(central / "bundle")
    revert(central / "bundle", central / "reverted", progress=False)
    calibrated = want.report.calibration
    data_free = min(
        (n for n in calibrated.candidates if n in DATA_FREE), key=lambda n: calibrated.candidates[n].dw_objective
    )
    assert calibrated.chosen != data_free  # the choice is the data's, not the dW error's

    shards = [five[:1], five[1:3], five[3:]]
    report = simulate(
        five,
        3,
        tmp_path / "fed",
        MergeOptions(storage_ratio=RATIO),
        shards=shards,
        calibration=Calibration(llama_base, examples, EXAMPLES),
    )
    state = tmp_path / "fed" / "coordinator" / "simulation"
    result = json.loads((state / "result" / "result.json").read_text())
    assert result["calibration"]["chosen"] == calibrated.chosen
    totals = result["calibration"]["totals"]
    assert list(totals) == list(calibrated.candidates)
    for name, candidate in calibrated.candidates.items():
        assert totals[name] == pytest.approx(candidate.total, rel=1e-9), (name, totals[name] / candidate.total - 1)
    got = [(m.method, m.ranks, m.size, m.p) for m in map(ModuleEntry.model_validate, result["modules"])]
    assert got == [(m.method, m.ranks, m.size, m.p) for m in want.modules]
    for site in report["sites"]:
        _assert_same_adapters(Path(site["reverted"]), central / "reverted", site["tasks"])
        assert 0 < site["seconds"]["calibrate"] < site["seconds"]["wait"]
    # A site's round-3 upload: one number per candidate, its tasks' divergences (as measured centrally) summed.
    for i, shard in enumerate(shards):
        (part,) = (state / "sites" / f"site{i}" / "calibration" / "parts").glob("*.safetensors")
        with open_safetensors(part) as f:
            assert sorted(f.keys()) == sorted(calibrated.candidates)
            assert all(f.get_slice(k).get_shape() == [] for k in f.keys())
            assert json.loads(f.metadata()["tasks"]) == sorted(p.name for p in shard)
        for name, x in read_divergences(part).items():
            want_sum = sum(calibrated.candidates[name].divergence[p.name] for p in shard)
            assert x == pytest.approx(want_sum, rel=1e-9), (i, name)
    # Sites read the chosen plan, never the totals: with two sites, a site's own sums and the totals give the other's.
    assert report["coordinator"]["calibration"] == {"chosen": calibrated.chosen, "candidates": list(totals)}


def test_a_calibrating_federation_refuses_a_site_without_calibration_data(ray_cluster, five, tmp_path):
    """The site names what it lacks in one line before uploading anything; and a calibration without method auto is
    refused in the config."""
    with pytest.raises(ValueError, match="calibrate chooses among method auto's plans"):
        FederationConfig(
            id="f",
            base_model="b",
            modules=module_specs(open_adapters(five[:1])),
            merge=MergeOptions(basis_size=2),
            sites={"s": Site(token_sha256=token_hash("t"))},
            calibrate=True,
        )
    adapters = open_adapters(five[:2])
    federation = FederationConfig(
        id="cal",
        base_model=adapters[0].base_model or "",
        modules=module_specs(adapters),
        sites={"s": Site(token_sha256=token_hash("t"))},
        calibrate=True,
    )
    coordinator = BackgroundCoordinator(
        CoordinatorConfig(port=0, state_dir=tmp_path / "state", insecure=True, federations=[federation])
    )
    try:
        with pytest.raises(RMMError, match="chooses its plan by calibration: run the site with --base"):
            run_site(
                f"127.0.0.1:{coordinator.port}", "cal", "s", Credentials("t", insecure=True), five[:2], tmp_path / "s"
            )
        assert not (tmp_path / "state" / "cal" / "sites" / "s" / "chunks").exists()  # nothing uploaded
    finally:
        coordinator.stop()
