"""Publishing coefficients (opt-in): the coordinator then reverts a site's tasks exactly as the site does.

Sites here are `SiteShard`s driven in-process (the Ray actor class, without Ray) against a real
coordinator on 127.0.0.1; `simulate` covers the same through Ray.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from conftest import make_adapter
from coordinator.config import CoordinatorConfig, FederationConfig, Site, token_hash
from protos.rmm.v1 import federation_pb2 as pb
from rmm.adapter import open_adapter
from rmm.summary import inspect_bundle
from rmm.bundle import MergeOptions, coefficients_file, read_manifest
from rmm.errors import RMMError
from rmm.io import read_all
from rmm.merge import module_specs, numbers_original, revert
from workers.client import Credentials, FederationClient
from workers.simulate import FEDERATION, BackgroundCoordinator, simulate
from workers.site import SiteShard, _site_manifest

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def heads(llama_base, tmp_path_factory):
    """Four adapters with a per-task head (modules_to_save), for sites a (2) and b (2)."""
    root = tmp_path_factory.mktemp("heads")
    return [
        make_adapter(llama_base, root / f"h{i}", seed=40 + i, shared=0.5, modules_to_save=["lm_head"]) for i in range(4)
    ]


def _assert_same_tasks(got_dir: Path, want_dir: Path, names) -> None:
    for name in names:
        got, want = open_adapter(got_dir / name), open_adapter(want_dir / name)
        assert got.modules.keys() == want.modules.keys() and got.extra_keys
        for m in want.modules:
            assert all(torch.equal(g, w) for g, w in zip(got.load_factors(m), want.load_factors(m))), (name, m)
        got_extras, want_extras = got.load_extras(), want.load_extras()
        assert got_extras.keys() == want_extras.keys() and all(
            torch.equal(got_extras[k], want_extras[k]) for k in want_extras
        )


def _refused(call, code: Code) -> None:
    with pytest.raises(RMMError, match=rf"failed \({code.name}\): "):  # the client's one-line error carries the status
        call()


def test_published_tasks_revert_at_the_coordinator_exactly_as_at_the_site(heads, tmp_path):
    adapters = [open_adapter(p) for p in heads]
    federation = FederationConfig(
        id="fed",
        base_model=adapters[0].base_model,
        modules=module_specs(adapters),
        merge=MergeOptions(basis_size=2),
        sites={s: Site(token_sha256=token_hash(f"token-{s}")) for s in "ab"},
    )
    coordinator = BackgroundCoordinator(
        CoordinatorConfig(port=0, state_dir=tmp_path / "state", insecure=True, federations=[federation])
    )
    address, result = f"127.0.0.1:{coordinator.port}", tmp_path / "state" / "fed" / "result"
    credentials = {s: Credentials(token=f"token-{s}", insecure=True) for s in "ab"}
    shards = {
        s: SiteShard(
            f"{s}-0", [str(p) for p in heads[i : i + 2]], str(tmp_path / s / "work"), address, "fed", s, credentials[s]
        )
        for s, i in (("a", 0), ("b", 2))
    }
    clients = {s: FederationClient(address, "fed", s, credentials[s]) for s in "ab"}
    try:
        for s, shard in shards.items():
            config = clients[s].join(_site_manifest([shard.manifest()], "moments", 0, False))
            part, _ = shard.upload(config["modules"], "moments", 0, False)
            clients[s].commit([pb.Part.FromString(part)])
        assert clients["a"].wait(60).state == "DONE"
        for s, shard in shards.items():
            shard.finish(MergeOptions(basis_size=2), str(tmp_path / s))
        assert sorted(p.name for p in result.iterdir()) == [
            "basis.safetensors",
            "result.json",
        ]  # nothing unless published

        tasks, sent = shards["a"].publish(str(tmp_path / "a"))
        tasks = [pb.PublishedTask.FromString(t) for t in tasks]
        assert sent > 0 and [t.name for t in tasks] == ["h0", "h1"]
        _refused(lambda: clients["b"].publish(tasks), Code.PERMISSION_DENIED)  # a's tasks, sent by b
        good = read_all(coefficients_file(tmp_path / "a" / "bundles" / "a-0", "h0"))
        key = next(iter(good))
        damaged = {
            "wrong shape": good | {key: good[key][:, :1].contiguous()},
            "missing key": {k: v for k, v in good.items() if k != key},
        }
        for name, tensors in damaged.items():
            save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file at all")
        for name in [*damaged, "corrupt"]:
            part = clients["a"].upload(tmp_path / f"{name}.safetensors", "coefficients")
            bad = pb.PublishedTask(name="h0", task_json=tasks[0].task_json, coefficients=part, extras=tasks[0].extras)
            _refused(lambda: clients["a"].publish([bad, tasks[1]]), Code.INVALID_ARGUMENT)
        assert sorted(p.name for p in result.iterdir()) == ["basis.safetensors", "result.json"]

        clients["a"].publish(tasks)
        clients["a"].publish(tasks[:1])  # again, same content: a no-op
        scaled = tmp_path / "scaled.safetensors"
        save_file({k: 2 * v for k, v in good.items()}, str(scaled))
        other = pb.PublishedTask(
            name="h0",
            task_json=tasks[0].task_json,
            coefficients=clients["a"].upload(scaled, "coefficients"),
            extras=tasks[0].extras,
        )
        _refused(lambda: clients["a"].publish([other]), Code.FAILED_PRECONDITION)

        revert(result, tmp_path / "coordinator-reverted", progress=False)
        _assert_same_tasks(tmp_path / "coordinator-reverted", tmp_path / "a" / "reverted", ["h0", "h1"])
        manifest = read_manifest(result)
        assert [t.name for t in manifest.tasks] == [
            "h0",
            "h1",
        ] and manifest.report.storage.numbers_original == numbers_original(adapters[:2])
        assert all(t.source == "site a" for t in manifest.tasks)  # no site-local paths reached the coordinator
        summary = inspect_bundle(result)  # what `rmm inspect` shows: no errors (only sites can measure them)
        assert summary["tasks_count"] == 2 and summary["tasks"] == {}
        assert all(m["max_error"] is None and 0 <= m["energy"]["B"] <= 1 for m in summary["modules"].values())
    finally:
        for c in clients.values():
            c.close()
        coordinator.stop()


def test_simulate_publishes_every_site_only_when_asked(ray_cluster, heads, tmp_path):
    options = MergeOptions(basis_size=2)
    report = simulate(heads, 2, tmp_path / "on", options, publish_coefficients=True)
    result = tmp_path / "on" / "coordinator" / FEDERATION / "result"
    revert(result, tmp_path / "coordinator-reverted", progress=False)
    for site in report["sites"]:
        assert site["bytes_published"] > 0
        _assert_same_tasks(tmp_path / "coordinator-reverted", Path(site["reverted"]), site["tasks"])

    report = simulate(heads, 2, tmp_path / "off", options)
    assert all(site["bytes_published"] == 0 for site in report["sites"])
    assert sorted(p.name for p in (tmp_path / "off" / "coordinator" / FEDERATION / "result").iterdir()) == [
        "basis.safetensors",
        "result.json",
    ]
