"""A 3-node Ray cluster on this machine: a site's actors, and one merge's modules, spread over its nodes.

The cluster runs in its own process (`python tests/test_cluster.py`, below) with its own RAY_TMPDIR: a Cluster
writes its address where a plain `ray.init()` looks for one, and this session's embedded Ray, other test processes
on the machine included, must not find it. Every driver of it is an `rmm` process, as a user would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import file_deltas
from coordinator.config import CoordinatorConfig, FederationConfig, Site, token_hash
from rmm.adapter import open_adapters
from rmm.bundle import MergeOptions, read_manifest
from rmm.errors import RMMError
from rmm.merge import merge, revert
from rmm.plan import module_specs
from workers.client import Credentials
from workers.cluster import ClusterMap
from workers.simulate import BackgroundCoordinator, simulate
from workers.site import run_site

RMM = str(Path(sys.executable).parent / "rmm")
NODES = 3


@pytest.fixture(scope="module")
def cluster():
    """(GCS address, environment for its drivers) of a 3-node cluster of one CPU each; the last node also
    advertises a GPU that torch here cannot see, so an actor that reserves a GPU though told --device cpu would
    wait for it forever (or fail there)."""
    temp = tempfile.mkdtemp(prefix="rmmc", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": temp}
    server = subprocess.Popen(
        [sys.executable, __file__], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        address = server.stdout.readline().strip()
        assert address, "the cluster did not start"
        yield address, env
    finally:
        server.stdin.close()  # the server shuts the cluster down
        server.wait(60)
        shutil.rmtree(temp, ignore_errors=True)


def _rmm(*args: str, env: dict) -> dict:
    done = subprocess.run([RMM, *args, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_a_sites_actors_spread_over_the_nodes_and_the_federation_equals_the_central_merge(cluster, adapters, tmp_path):
    address, env = cluster
    opened = open_adapters(adapters)
    federation = FederationConfig(
        id="fed",
        base_model=opened[0].base_model or "",
        modules=module_specs(opened),
        merge=MergeOptions(),
        sites={"a": Site(token_sha256=token_hash("t"))},
    )
    coordinator = BackgroundCoordinator(
        CoordinatorConfig(port=0, state_dir=tmp_path / "state", insecure=True, federations=[federation])
    )
    try:
        site = ["--coordinator", f"127.0.0.1:{coordinator.port}", "--federation", "fed", "--site", "a", "--insecure"]
        report = _rmm(
            "site",
            "run",
            *site,
            "--adapters",
            *map(str, adapters),
            "--actors",
            "3",
            "--ray-address",
            address,
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "a"),
            env={**env, "RMM_SITE_TOKEN": "t"},
        )["sites"][0]
    finally:
        coordinator.stop()
    assert report["actors"] == 3 and report["device"] == "cpu"
    assert len(set(report["nodes"])) == NODES, report["nodes"]  # an actor per node
    _assert_reverts_as_the_cpu_merge(adapters, tmp_path / "a" / "reverted", tmp_path / "central")


def test_merge_spread_over_the_cluster_is_the_local_merge_bit_for_bit(cluster, adapters, tmp_path):
    """Curves on the actors, the allocation on the driver, the solves on the actors: the same plan and the same
    bytes in every tensor file (the actors compute single-threaded, as a local merge's module threads do)."""
    address, env = cluster
    summary = _rmm(
        "merge",
        *map(str, adapters),
        "--out",
        str(tmp_path / "spread"),
        "--ray-address",
        address,
        "--device",
        "cpu",
        env=env,
    )
    local = merge(adapters, tmp_path / "local", progress=False)
    spread = read_manifest(tmp_path / "spread")
    assert spread.modules == local.modules
    assert spread.files == local.files  # sha256 of the basis and of every task's coefficients
    passes = summary["cluster"]["passes"]
    assert [sorted(p) for p in passes] == [sorted(m.name for m in local.modules)] * 2  # curves, then solves
    assert summary["cluster"]["device"] == "cpu"
    for placed in passes:
        assert len(set(placed.values())) == NODES, placed  # 6 modules, 3 one-CPU nodes: 2 modules each


def test_merge_auto_computes_on_the_clusters_gpus_whatever_the_driver_has(cluster, adapters, tmp_path):
    """--device auto means the cluster's GPUs, though this driver has none. One node here offers Ray a GPU that
    torch cannot use: the merge stops there in one line, and writes nothing."""
    address, env = cluster
    out = tmp_path / "auto"
    args = ["merge", *map(str, adapters), "--out", str(out), "--ray-address", address, "--json"]
    done = subprocess.run([RMM, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "offers a GPU, but torch there sees no CUDA GPU" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_site_on_a_node_whose_torch_sees_no_gpu_says_so_in_one_line(cluster, adapters, tmp_path):
    """--device auto on a cluster offering a GPU: the site's actor is placed on that node, whose torch has no CUDA;
    the site stops there, before it joins, in one line (as the cluster merge does)."""
    address, env = cluster
    args = ["site", "run", "--coordinator", "127.0.0.1:1", "--federation", "f", "--site", "s", "--insecure"]
    args += ["--adapters", str(adapters[0]), "--ray-address", address, "--out", str(tmp_path / "s"), "--json"]
    done = subprocess.run([RMM, *args], env={**env, "RMM_SITE_TOKEN": "t"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "offers a GPU, but torch there sees no CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_a_site_asked_for_cuda_on_a_cluster_without_gpus_says_so_before_joining(ray_cluster, adapters, tmp_path):
    credentials = Credentials(token="t", insecure=True)
    with pytest.raises(RMMError, match="no GPU"):
        run_site("127.0.0.1:1", "f", "s", credentials, adapters[:1], tmp_path, device="cuda")
    with pytest.raises(RMMError, match="GPU share must be in"):
        run_site("127.0.0.1:1", "f", "s", credentials, adapters[:1], tmp_path, device="cpu", gpu_share=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sites_on_cuda_equal_the_central_merge(ray_cluster, adapters, tmp_path):
    """Two sites on one GPU: each actor reserves half of it (a whole one each would wait for the other forever)."""
    report = simulate(adapters, 2, tmp_path / "fed", device="cuda")
    assert [s["device"] for s in report["sites"]] == ["cuda", "cuda"]
    for site in report["sites"]:
        _assert_reverts_as_the_cpu_merge(adapters, Path(site["reverted"]), tmp_path / "central", site["tasks"])


def test_a_merge_asked_for_cuda_on_a_cluster_without_gpus_says_so_and_writes_nothing(ray_cluster, adapters, tmp_path):
    with pytest.raises(RMMError, match="no GPU"), ClusterMap("cuda") as spread:
        merge(adapters, tmp_path / "gpu", device="cpu", map_modules=spread, progress=False)
    assert not (tmp_path / "gpu").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_merge_on_the_clusters_gpus_equals_the_cpu_merge(ray_cluster, adapters, tmp_path):
    """The driver computes on its CPU (a CPU head node), the actors on the cluster's GPUs."""
    with ClusterMap() as spread:
        merge(adapters, tmp_path / "gpu", device="cpu", map_modules=spread, progress=False)
    assert spread.computed_on == "cuda"
    assert {node for placed in spread.passes for node in placed.values()}  # computed by the actors
    revert(tmp_path / "gpu", tmp_path / "gpu-reverted", device="cpu", progress=False)
    _assert_reverts_as_the_cpu_merge(adapters, tmp_path / "gpu-reverted", tmp_path / "central")


def _assert_reverts_as_the_cpu_merge(adapters, reverted: Path, work: Path, names=None) -> None:
    """Every adapter of `names` (default all) in `reverted` has the dW that a local CPU merge and revert give it."""
    merge(adapters, work / "bundle", device="cpu", progress=False, force=True)
    revert(work / "bundle", work / "reverted", device="cpu", progress=False, force=True)
    for name in names or [a.name for a in adapters]:
        got, want = file_deltas(reverted / name), file_deltas(work / "reverted" / name)
        assert got.keys() == want.keys()
        for m in want:
            assert ((got[m] - want[m]).norm() / want[m].norm()).item() < 1e-5, (name, m)


def _serve() -> None:
    """The cluster, until stdin closes: its address on stdout, then nothing."""
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    for i in range(NODES):
        head = {"include_dashboard": False} if i == 0 else {}
        cluster.add_node(num_cpus=1, num_gpus=int(i == NODES - 1), object_store_memory=80 << 20, **head)
    print(cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()


if __name__ == "__main__":
    _serve()
