"""Federated == centralised through real Ray actors and a real gRPC coordinator on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_adapter
from coordinator.certs import make_dev_certs
from coordinator.config import CoordinatorConfig, FederationConfig, Site, load_config, token_hash
from protos.rmm.v1 import federation_pb2 as pb
from protos.rmm.v1.wire import Retry
from rmm.adapter import delta_weight, open_adapter
from rmm.bundle import MergeOptions, read_manifest
from rmm.errors import RMMError
from rmm.merge import merge, revert
from rmm.payload import write_payload
from rmm.plan import module_specs, numbers_original, plan_modules
from workers.client import Credentials, FederationClient
from workers.simulate import BackgroundCoordinator, simulate
from workers.site import run_site

OPTIONS = MergeOptions(basis_size=3, canonicalize=True)


@pytest.fixture(scope="module")
def seven(llama_base, tmp_path_factory):
    """Seven related adapters of ranks 2, 4 and 6, to be split 1 / 2 / 4 across three sites."""
    root = tmp_path_factory.mktemp("seven")
    return [make_adapter(llama_base, root / f"t{i}", seed=20 + i, shared=0.5, r=2 + 2 * (i % 3)) for i in range(7)]


@pytest.fixture(scope="module")
def centralised(seven, tmp_path_factory):
    out = tmp_path_factory.mktemp("central")
    merge(seven, out / "bundle", OPTIONS, progress=False)
    revert(out / "bundle", out / "reverted", progress=False)
    return out / "reverted"


def _dW(adapter_dir: Path) -> dict[str, torch.Tensor]:
    a = open_adapter(adapter_dir)
    return {m: delta_weight(*a.load_factors(m)) for m in a.modules}


def _assert_same_adapters(got_dir: Path, want_dir: Path, names):
    for name in names:
        got, want = _dW(got_dir / name), _dW(want_dir / name)
        assert got.keys() == want.keys()
        for m in want:
            assert ((got[m] - want[m]).norm() / want[m].norm()).item() < 1e-5, (name, m)


@pytest.mark.parametrize("kind", ["moments", "sketch", "factors", "auto"])
def test_simulated_federation_equals_centralised_merge(ray_cluster, seven, centralised, tmp_path, kind):
    shards = [seven[:1], seven[1:3], seven[3:]]
    report = simulate(seven, 3, tmp_path, OPTIONS, upload=kind, sketch_rank=6, shards=shards)
    assert [len(s["tasks"]) for s in report["sites"]] == [1, 2, 4]
    if kind == "auto":  # r = 6: 1, 2 and 4 tasks are all below (r + 3) / 2, so every site sends its exact sketch
        assert [s["upload"] for s in report["sites"]] == ["sketch"] * 3
        assert all(s["payload_numbers"] == s["smallest_exact_numbers"] for s in report["sites"])
    for site in report["sites"]:
        _assert_same_adapters(Path(site["reverted"]), centralised, site["tasks"])
        assert site["bytes_up"] == site["payload_bytes"] > 0 and site["bytes_down"] > 0
    assert report["coordinator"]["state"] == "DONE"


def test_simulated_federation_runs_the_allocator_in_two_rounds_as_merge_does(ray_cluster, seven, tmp_path):
    """Method auto (the default) over three uneven sites: spectra, then curves; the sites' plan and
    reverted adapters are the centralised merge's, and no site sends its factors."""
    options = MergeOptions(storage_ratio=0.6)
    central = merge(seven, tmp_path / "central" / "bundle", options, progress=False)
    revert(tmp_path / "central" / "bundle", tmp_path / "central" / "reverted", progress=False)
    assert {m.method for m in central.modules} == {"truncate", "joint"}
    shards = [seven[:1], seven[1:3], seven[3:]]
    report = simulate(seven, 3, tmp_path / "fed", options, shards=shards, publish_coefficients=True)
    assert report["coordinator"]["state"] == "DONE" and {s["upload"] for s in report["sites"]} == {"spectra"}
    for i, site in enumerate(report["sites"]):
        _assert_same_adapters(Path(site["reverted"]), tmp_path / "central" / "reverted", site["tasks"])
        bundle = read_manifest(tmp_path / "fed" / f"site{i}" / "bundles" / f"site{i}-0")
        for got, want in zip(bundle.modules, central.modules):
            assert (got.method, got.size) == (want.method, want.size)
            assert got.ranks is None or got.ranks == {t: want.ranks[t] for t in site["tasks"]}
    # Published coefficients make the coordinator's result a bundle that reverts every task.
    result = tmp_path / "fed" / "coordinator" / "simulation" / "result"
    revert(result, tmp_path / "at-coordinator", progress=False)
    _assert_same_adapters(tmp_path / "at-coordinator", tmp_path / "central" / "reverted", [p.name for p in seven])
    with pytest.raises(RMMError, match="method auto uploads spectra"):
        simulate(seven, 3, tmp_path / "bad", options, upload="moments")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coordinator_and_two_sites_in_their_own_processes_over_mtls(ray_cluster, seven, centralised, tmp_path):
    certs = make_dev_certs(tmp_path / "certs", ["a", "b"])
    tokens = {"a": "token-of-a", "b": "token-of-b"}
    port = _free_port()
    adapters = [open_adapter(p) for p in seven]
    federation = FederationConfig(
        id="fed",
        base_model=adapters[0].base_model,
        modules=module_specs(adapters),
        merge=OPTIONS,
        sites={s: Site(token_sha256=token_hash(t)) for s, t in tokens.items()},
        min_sites=2,
        deadline_seconds=300,
    )
    config = {
        "port": port,
        "state_dir": str(tmp_path / "state"),
        "federations": [federation.model_dump(mode="json")],
        "tls": {"cert": str(certs["server_cert"]), "key": str(certs["server_key"]), "client_ca": str(certs["ca_cert"])},
    }
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    rmm = [sys.executable, "-m", "rmm.cli"]
    server = subprocess.Popen(
        [*rmm, "coordinator", "serve", "--config", str(tmp_path / "fed.yaml")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    sites = []
    try:
        address = ray_cluster.get_runtime_context().gcs_address
        for site, shard in (("a", seven[:3]), ("b", seven[3:])):
            (tmp_path / f"{site}.token").write_text(tokens[site])
            sites.append(
                subprocess.Popen(
                    [
                        *rmm,
                        "site",
                        "run",
                        "--coordinator",
                        f"127.0.0.1:{port}",
                        "--federation",
                        "fed",
                        "--site",
                        site,
                        "--token-file",
                        str(tmp_path / f"{site}.token"),
                        "--ca",
                        str(certs["ca_cert"]),
                        "--cert",
                        str(certs[f"{site}_cert"]),
                        "--key",
                        str(certs[f"{site}_key"]),
                        "--adapters",
                        *map(str, shard),
                        "--canonicalize",
                        "--ray-address",
                        address,
                        "--out",
                        str(tmp_path / site),
                        "--json",
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for p in sites:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in sites:
            p.kill()
        server.terminate()
        server.wait(30)
    _assert_same_adapters(tmp_path / "a" / "reverted", centralised, [p.name for p in seven[:3]])
    _assert_same_adapters(tmp_path / "b" / "reverted", centralised, [p.name for p in seven[3:]])


def test_upload_resumes_after_a_dropped_connection_and_a_coordinator_restart(seven, tmp_path):
    """Chunks acknowledged before the drop are not sent again, even to a restarted coordinator."""
    adapters = [open_adapter(p) for p in seven]
    federation = FederationConfig(
        id="fed",
        base_model=adapters[0].base_model,
        modules=module_specs(adapters),
        merge=MergeOptions(basis_size=2),
        sites={"a": Site(token_sha256=token_hash("t"))},
        upload_kinds=["factors"],
    )
    config = CoordinatorConfig(port=0, state_dir=tmp_path / "state", insecure=True, federations=[federation])
    modules = plan_modules(module_specs(adapters), 7, numbers_original(adapters), MergeOptions(basis_size=2))
    payload = tmp_path / "a.safetensors"
    write_payload(adapters, modules, payload, "factors")
    manifest = pb.SiteManifest(
        base_model=federation.base_model,
        tasks=[a.name for a in adapters],
        upload_kind="factors",
        lora_numbers=numbers_original(adapters),
        modules=[
            pb.Module(name=m.name, out_features=m.out_features, in_features=m.in_features, rank=m.rank)
            for m in federation.modules
        ],
    )
    chunk = 4096
    credentials = Credentials(token="t", insecure=True)

    coordinator = BackgroundCoordinator(config)
    client = FederationClient(f"127.0.0.1:{coordinator.port}", "fed", "a", credentials, chunk_size=chunk)
    client.join(manifest)
    data = payload.read_bytes()
    total = -(-len(data) // chunk)
    assert total > 4
    for i in range(3):  # the connection drops after three acknowledged chunks
        block = data[i * chunk : (i + 1) * chunk]
        client.stub.UploadChunk(
            pb.UploadChunkRequest(
                federation_id="fed", site_id="a", sha256=hashlib.sha256(block).hexdigest(), data=block
            ),
            metadata=client.metadata,
        )
    client.close()
    coordinator.stop()

    coordinator = BackgroundCoordinator(config)  # a new process's worth of state: only the disk
    try:
        client = FederationClient(f"127.0.0.1:{coordinator.port}", "fed", "a", credentials, chunk_size=chunk)
        part = client.upload(payload, "a-0")
        assert (client.traffic.chunks_skipped, client.traffic.chunks_sent) == (3, total - 3)
        client.commit([part])
        assert client.wait(60).state == "DONE"
        client.download(tmp_path / "basis.safetensors")
        client.close()
    finally:
        coordinator.stop()


def test_unauthenticated_site_cannot_join(seven, tmp_path):
    adapters = [open_adapter(p) for p in seven]
    federation = FederationConfig(
        id="fed",
        base_model=adapters[0].base_model,
        modules=module_specs(adapters),
        merge=MergeOptions(basis_size=2),
        sites={"a": Site(token_sha256=token_hash("t"))},
    )
    coordinator = BackgroundCoordinator(
        CoordinatorConfig(port=0, state_dir=tmp_path / "state", insecure=True, federations=[federation])
    )
    try:
        client = FederationClient(
            f"127.0.0.1:{coordinator.port}", "fed", "a", Credentials(token="wrong", insecure=True), timeout=5
        )
        # One line carrying the coordinator's message, not a gRPC traceback.
        with pytest.raises(
            RMMError,
            match=r"^coordinator 127\.0\.0\.1:\d+: Join failed \(UNAUTHENTICATED\): the token is not valid for any "
            r"site",
        ):
            client.join(pb.SiteManifest(base_model=federation.base_model, tasks=["x"], upload_kind="moments"))
        client.close()
    finally:
        coordinator.stop()


def test_example_deploy_config_is_valid():
    config = load_config(Path(__file__).resolve().parents[1] / "deploy" / "federation.example.yaml")
    assert config.tls.client_ca and config.federations[0].min_sites == 2
    assert config.federations[0].merge == MergeOptions(method="auto", storage_ratio=0.5)


def test_a_federation_holds_its_merge_options_as_rmm_merge_reads_them(tmp_path):
    """The merge options sit under `merge:`, with merge's rule: canonicalize implies rmm-paper (and its uploads),
    and contradicts method auto; the same keys at the federation's top level are unknown."""
    file = tmp_path / "fed.yaml"
    module = "{name: q, out_features: 4, in_features: 4, rank: 2, p: 0}"

    def load(merge: str):
        sites = f"{{a: {{token_sha256: {'a' * 64}}}}}"
        federation = f"{{id: f, base_model: m, modules: [{module}], sites: {sites}, {merge}}}"
        file.write_text(f"insecure: true\nfederations: [{federation}]\n")
        return load_config(file).federations[0]

    fed = load("merge: {canonicalize: true}")
    assert (fed.merge.method, fed.merge.canonicalize, fed.merge.storage_ratio) == ("rmm-paper", True, 0.5)
    assert fed.upload_kinds == ["moments", "sketch"]
    fed = load("merge: {basis_size: 3}")
    assert (fed.merge.method, fed.merge.basis_size, fed.merge.storage_ratio) == ("rmm-paper", 3, None)
    fed = load("min_sites: 1")
    assert fed.merge == MergeOptions(method="auto", storage_ratio=0.5) and fed.upload_kinds == ["spectra"]
    one_line = r"fed\.yaml: invalid config at federations\.0\.merge: .*canonicalize apply to method rmm-paper[^\n]*$"
    with pytest.raises(RMMError, match=one_line):
        load("merge: {method: auto, canonicalize: true}")
    with pytest.raises(
        RMMError,
        match=r"at federations\.0\.storage_ratio: Extra inputs are not permitted; merge options go under merge:",
    ):
        load("storage_ratio: 0.5")


def test_config_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "fed.yaml"
    bad.write_text(
        "port: 1\ninsecure: true\nfederations: [{id: f, base_model: m, modules: [], sites: {}, colour: red}]\n"
    )
    with pytest.raises(RMMError, match=r"fed.yaml: invalid config at federations\.0"):
        load_config(bad)
    bad.write_text("port: 1\n")
    with pytest.raises(RMMError, match="TLS is required"):
        load_config(bad)


def test_one_coordinator_per_state_directory_and_one_token_per_site(seven, tmp_path):
    adapters = [open_adapter(p) for p in seven]
    sites = {"a": Site(token_sha256=token_hash("t"))}
    federation = FederationConfig(
        id="fed",
        base_model=adapters[0].base_model,
        modules=module_specs(adapters),
        merge=MergeOptions(basis_size=2),
        sites=sites,
    )
    config = CoordinatorConfig(port=0, state_dir=tmp_path / "state", insecure=True, federations=[federation])
    first = BackgroundCoordinator(config)
    try:
        with pytest.raises(RMMError, match="another coordinator is using this state directory"):
            BackgroundCoordinator(config)
    finally:
        first.stop()
    BackgroundCoordinator(config).stop()  # the lock went with the first one
    with pytest.raises(ValueError, match="two sites share a token"):
        FederationConfig(
            id="f", base_model="m", modules=module_specs(adapters), sites={"a": sites["a"], "b": sites["a"]}
        )


def test_site_restarted_with_other_actors_and_adapter_order_comes_back(ray_cluster, seven, tmp_path):
    """A site that committed, then died, comes back with --actors 1 instead of 2 and its adapters in
    another order: its manifest is the same, it does not upload again, and it finishes with the
    centralised merge's adapters."""
    options = MergeOptions(storage_ratio=0.6)
    adapters = seven[:4]
    merge(adapters, tmp_path / "central" / "bundle", options, progress=False)
    revert(tmp_path / "central" / "bundle", tmp_path / "central" / "reverted", progress=False)
    opened = [open_adapter(p) for p in adapters]
    federation = FederationConfig(
        id="fed",
        base_model=opened[0].base_model,
        modules=module_specs(opened),
        merge=options,
        sites={"a": Site(token_sha256=token_hash("t"))},
    )
    coordinator = BackgroundCoordinator(
        CoordinatorConfig(port=0, state_dir=tmp_path / "state", insecure=True, federations=[federation])
    )

    def run(actors, dirs, on_stage=lambda site, stage: None):
        return run_site(
            f"127.0.0.1:{coordinator.port}",
            "fed",
            "a",
            Credentials(token="t", insecure=True),
            dirs,
            tmp_path / "site",
            actors=actors,
            wait_timeout=120,
            on_stage=on_stage,
        )

    class Died(Exception):
        pass

    def die_once_committed(site, stage):
        if stage == "wait":
            raise Died("the site dies after its commit")

    try:
        with pytest.raises(Died):
            run(2, adapters, die_once_committed)
        report = run(1, adapters[::-1])
    finally:
        coordinator.stop()
    assert (
        report["bytes_up"] < (tmp_path / "site" / "work" / "0" / "a-0.payload.safetensors").stat().st_size
    )  # only its curves
    _assert_same_adapters(tmp_path / "site" / "reverted", tmp_path / "central" / "reverted", [p.name for p in adapters])


def test_site_and_coordinator_failures_are_one_line_errors(ray_cluster, seven, tmp_path):
    """`rmm site run` refused by the coordinator prints its message on one line (exit 2, no traceback);
    a coordinator whose TLS key is not a PEM key says so, naming the file."""
    adapters = [open_adapter(p) for p in seven]
    federation = FederationConfig(
        id="fed",
        base_model=adapters[0].base_model,
        modules=module_specs(adapters),
        sites={"a": Site(token_sha256=token_hash("t"))},
    )
    coordinator = BackgroundCoordinator(
        CoordinatorConfig(port=0, state_dir=tmp_path / "state", insecure=True, federations=[federation])
    )
    (tmp_path / "token").write_text("wrong")
    try:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "rmm.cli",
                "site",
                "run",
                "--coordinator",
                f"127.0.0.1:{coordinator.port}",
                "--federation",
                "fed",
                "--site",
                "a",
                "--token-file",
                str(tmp_path / "token"),
                "--insecure",
                "--adapters",
                *map(str, seven[:2]),
                "--out",
                str(tmp_path / "out"),
                "--ray-address",
                ray_cluster.get_runtime_context().gcs_address,
                "--json",
            ],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        coordinator.stop()
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Join failed (UNAUTHENTICATED): the token is not valid for any site" in errors[0], (
        run.stderr[-2000:]
    )
    certs = make_dev_certs(tmp_path / "certs", ["a"])
    (tmp_path / "bad.key").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    config = CoordinatorConfig(
        port=0,
        state_dir=tmp_path / "tls",
        federations=[federation],
        tls={"cert": certs["server_cert"], "key": tmp_path / "bad.key"},
    )
    with pytest.raises(RMMError, match=r"bad\.key: not a PEM private key"):
        BackgroundCoordinator(config)
    config = CoordinatorConfig(
        port=0,
        state_dir=tmp_path / "tls",
        federations=[federation],
        tls={"cert": certs["server_cert"], "key": certs["a_key"]},
    )
    with pytest.raises(RMMError, match=r"a\.key.*does not belong to the certificate"):
        BackgroundCoordinator(config)


def test_client_retries_an_unreachable_coordinator_for_its_retry_time_then_says_so(tmp_path):
    """Nothing listens: every attempt is UNAVAILABLE; the client retries (one log line each) for Retry.seconds, then
    one RMMError."""
    client = FederationClient(
        f"127.0.0.1:{_free_port()}",
        "fed",
        "a",
        Credentials(token="t", insecure=True),
        timeout=30,
        retry=Retry(seconds=2),
    )
    clock = time.monotonic()
    with pytest.raises(RMMError, match=r"Status failed \(UNAVAILABLE\): .* \(retried for 2 s\)$"):
        client.status()
    assert 1.5 < time.monotonic() - clock < 10
    client.close()


def test_a_coordinator_certificate_the_site_cannot_verify_fails_at_once(seven, tmp_path):
    """A TLS handshake the site rejects (a CA that did not sign the coordinator) is a configuration error, not a
    restart: one RMMError naming the handshake at once, not after the whole retry time."""
    adapters = [open_adapter(p) for p in seven]
    ours, theirs = make_dev_certs(tmp_path / "ours", ["a"]), make_dev_certs(tmp_path / "theirs", ["a"])
    federation = FederationConfig(
        id="fed",
        base_model=adapters[0].base_model,
        modules=module_specs(adapters),
        sites={"a": Site(token_sha256=token_hash("t"))},
    )
    tls = {"cert": ours["server_cert"], "key": ours["server_key"], "client_ca": ours["ca_cert"]}
    coordinator = BackgroundCoordinator(
        CoordinatorConfig(port=0, state_dir=tmp_path / "state", tls=tls, federations=[federation])
    )
    wrong_ca = Credentials(token="t", ca=theirs["ca_cert"], cert=ours["a_cert"], key=ours["a_key"])
    client = FederationClient(f"127.0.0.1:{coordinator.port}", "fed", "a", wrong_ca, retry=Retry(seconds=60))
    clock = time.monotonic()
    try:
        with pytest.raises(
            RMMError, match=r"Status failed \(UNAVAILABLE\): TLS handshake with the coordinator failed .*--ca"
        ):
            client.status()
    finally:
        client.close()
        coordinator.stop()
    assert time.monotonic() - clock < 10
