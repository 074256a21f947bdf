"""The coordinator over real gRPC on loopback, with real payloads from real PEFT adapters.

It must give the centralised basis, refuse bad calls without touching its state, require TLS
credentials when configured, survive a restart, and close at its deadline with or without quorum.
"""

import asyncio
import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.certs import make_dev_certs
from coordinator.config import CoordinatorConfig, FederationConfig, TLSConfig, token_hash
from coordinator.server import Coordinator
from protos.rmm.v1 import federation_pb2 as pb, federation_pb2_grpc as pb_grpc
from protos.rmm.v1.wire import MAX_CHUNK
from rmm.adapter import open_adapter
from rmm.bundle import MergeOptions
from rmm.errors import RMMError
from rmm.merge import merge, module_specs, numbers_original, plan_modules
from rmm.io import open_safetensors
from rmm.payload import aggregate, split_candidates, write_curves, write_divergences, write_payload, write_spectra
from rmm.plan import PLAN

CHUNK = 8 * 1024  # small chunks, so every part spans several
SHARDS = {"a": ("moments", [0]), "b": ("sketch", [1, 2]), "c": ("factors", [3, 4])}  # uneven, every kind
ALL_KINDS = ["moments", "sketch", "factors"]
Code = grpc.StatusCode


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def auth(site: str) -> tuple:
    return (("authorization", f"Bearer token-{site}"),)


@pytest.fixture(scope="module")
def world(adapters, tmp_path_factory):
    """Each site's payload file and manifest, written the way a site writes them."""
    root = tmp_path_factory.mktemp("payloads")
    opened = [open_adapter(p) for p in adapters]
    specs = module_specs(opened)
    sites = {}
    for site, (kind, idx) in SHARDS.items():
        shard = [opened[i] for i in idx]
        file = root / f"{site}.safetensors"
        write_payload(shard, specs, file, kind, q=4 if kind == "sketch" else None)
        manifest = pb.SiteManifest(
            base_model=opened[0].base_model,
            modules=[
                pb.Module(name=m.name, out_features=m.out_features, in_features=m.in_features, rank=m.rank)
                for m in module_specs(shard)
            ],
            tasks=[a.name for a in shard],
            upload_kind=kind,
            sketch_rank=4 if kind == "sketch" else 0,
            lora_numbers=numbers_original(shard),
            tool_version="test",
        )
        sites[site] = SimpleNamespace(file=file, manifest=manifest)
    return SimpleNamespace(base_model=opened[0].base_model, specs=specs, sites=sites)


def federation(world, fed_id="fed", sites="abc", **overrides) -> FederationConfig:
    fields = dict(
        id=fed_id,
        base_model=world.base_model,
        modules=world.specs,
        merge=MergeOptions(basis_size=2),
        upload_kinds=ALL_KINDS,
    )
    return FederationConfig(
        **(fields | overrides), sites={s: {"token_sha256": token_hash(f"token-{s}")} for s in sites}
    )


def coordinator_config(state_dir, *feds, **overrides) -> CoordinatorConfig:
    return CoordinatorConfig(
        **(
            {"host": "127.0.0.1", "port": 0, "state_dir": state_dir, "insecure": True, "federations": list(feds)}
            | overrides
        )
    )


@contextlib.asynccontextmanager
async def serving(config, channel_credentials=None, target="127.0.0.1"):
    coordinator = Coordinator(config)
    port = await coordinator.start()
    address = f"{target}:{port}"
    channel = (
        grpc.aio.secure_channel(address, channel_credentials)
        if channel_credentials
        else grpc.aio.insecure_channel(address)
    )
    try:
        yield pb_grpc.FederationStub(channel), channel, port
    finally:
        await channel.close()
        await coordinator.stop(0)


def chunks_of(file):
    data = file.read_bytes()
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return pieces, pb.Part(name=file.stem, chunks=[sha(c) for c in pieces], sha256=sha(data), size=len(data))


async def upload(stub, fed, site, file, skip_last=False) -> pb.Part:
    pieces, part = chunks_of(file)
    ask = pb.MissingChunksRequest(federation_id=fed, site_id=site, sha256=part.chunks)
    missing = set((await stub.MissingChunks(ask, metadata=auth(site), timeout=10)).sha256)
    for data in pieces[:-1] if skip_last else pieces:
        if sha(data) in missing:
            await stub.UploadChunk(
                pb.UploadChunkRequest(federation_id=fed, site_id=site, sha256=sha(data), data=data),
                metadata=auth(site),
                timeout=10,
            )
    return part


async def join_and_commit(stub, world, site, fed="fed"):
    await stub.Join(
        pb.JoinRequest(federation_id=fed, site_id=site, manifest=world.sites[site].manifest),
        metadata=auth(site),
        timeout=10,
    )
    part = await upload(stub, fed, site, world.sites[site].file)
    await stub.Commit(pb.CommitRequest(federation_id=fed, site_id=site, parts=[part]), metadata=auth(site), timeout=30)
    return part


async def status(stub, site, fed="fed", wait=0.0) -> pb.StatusResponse:
    request = pb.StatusRequest(federation_id=fed, site_id=site, wait=wait > 0, timeout_seconds=wait)
    return await stub.Status(request, metadata=auth(site), timeout=wait + 10)


async def download(stub, site, fed="fed", offset=0) -> bytes:
    out = b""
    async for chunk in stub.DownloadBasis(
        pb.DownloadRequest(federation_id=fed, site_id=site, offset=offset), metadata=auth(site), timeout=30
    ):
        assert chunk.offset == offset + len(out) and chunk.sha256 == sha(chunk.data)
        out += chunk.data
    return out


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_three_sites_get_the_centralised_basis(world, tmp_path):
    async def main():
        async with serving(coordinator_config(tmp_path / "state", federation(world))) as (stub, _, _):
            await asyncio.gather(*(join_and_commit(stub, world, s) for s in SHARDS))
            done = await status(stub, "a", wait=30)
            # Retries of a join and a commit are harmless.
            config = await stub.Join(
                pb.JoinRequest(federation_id="fed", site_id="c", manifest=world.sites["c"].manifest),
                metadata=auth("c"),
                timeout=10,
            )
            await stub.Commit(
                pb.CommitRequest(federation_id="fed", site_id="c", parts=[chunks_of(world.sites["c"].file)[1]]),
                metadata=auth("c"),
                timeout=10,
            )
            basis = await download(stub, "b")
            tail = await download(stub, "b", offset=100)
            reports = [
                json.loads(
                    (
                        await stub.Report(
                            pb.ReportRequest(federation_id="fed", site_id=s), metadata=auth(s), timeout=10
                        )
                    ).json
                )
                for s in "abc"
            ]
        return done, config, basis, tail, reports

    done, config, basis, tail, reports = asyncio.run(main())
    assert done.state == "DONE", done.message
    # A site learns only about itself: its own membership, counts of the others, never their ids.
    assert done.committed_sites == ["a"] and done.joined_sites == ["a"]
    assert done.message == "aggregated 5 tasks of 3 sites"
    assert json.loads(config.federation_config_json)["sites"] == ["c"]
    files = [world.sites[s].file for s in "abc"]
    lora = sum(world.sites[s].manifest.lora_numbers for s in "abc")
    modules = plan_modules(world.specs, 5, lora, MergeOptions(basis_size=2))
    aggregate(files, modules, tmp_path / "central.safetensors", torch.float32)
    assert basis == (tmp_path / "central.safetensors").read_bytes()
    assert tail == basis[100:]
    assert (done.basis_sha256, done.basis_size) == (sha(basis), len(basis))
    assert "token_sha256" not in config.federation_config_json
    report = reports[0]
    assert report["state"] == "DONE" and [m["p"] for m in report["modules"]] == [m.p for m in modules]
    assert report["aggregated_sites"] == 3  # counted, not named
    rows = {
        s: r["sites"][s] for s, r in zip("abc", reports) if list(r["sites"]) == [s]
    }  # each site sees its own row only
    assert {s: r["tasks"] for s, r in rows.items()} == {"a": 1, "b": 2, "c": 2}
    assert {s: r["bytes_received"] for s, r in rows.items()} == {s: world.sites[s].file.stat().st_size for s in "abc"}
    assert {s: r["bytes_sent"] for s, r in rows.items()} == {"a": 0, "b": 2 * len(basis) - 100, "c": 0}
    assert set(report["energy"]) == {m.name for m in modules}


def test_refused_calls_change_nothing(world, tmp_path):
    state_dir = tmp_path / "state"
    fed = federation(world, upload_kinds=["moments", "factors"])
    a = world.sites["a"]

    async def main():
        async with serving(coordinator_config(state_dir, fed)) as (stub, channel, _):
            health = health_pb2_grpc.HealthStub(channel)

            async def refused(make_call, code, *words):
                before = snapshot(state_dir)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await make_call()
                assert e.value.code() == code, e.value.details()
                for word in words:
                    assert word in e.value.details()
                assert snapshot(state_dir) == before
                check = await health.Check(health_pb2.HealthCheckRequest(service="rmm.v1.Federation"), timeout=5)
                assert check.status == health_pb2.HealthCheckResponse.SERVING

            def join(manifest, site="a", token_site="a", fed_id="fed"):
                return lambda: stub.Join(
                    pb.JoinRequest(federation_id=fed_id, site_id=site, manifest=manifest),
                    metadata=auth(token_site),
                    timeout=10,
                )

            ask = pb.StatusRequest(federation_id="fed", site_id="a")
            await refused(
                lambda: stub.Status(ask, metadata=auth("nobody"), timeout=5), Code.UNAUTHENTICATED, "not valid"
            )
            await refused(lambda: stub.Status(ask, timeout=5), Code.UNAUTHENTICATED, "missing")
            await refused(join(a.manifest, site="b"), Code.PERMISSION_DENIED, "belongs to site a")
            await refused(join(a.manifest, fed_id="other"), Code.NOT_FOUND, "other")

            def changed(**fields):
                m = pb.SiteManifest()
                m.CopyFrom(a.manifest)
                for key, value in fields.items():
                    if isinstance(value, list):  # repeated fields are replaced in place
                        del getattr(m, key)[:]
                        getattr(m, key).extend(value)
                    else:
                        setattr(m, key, value)
                return m

            mods = list(a.manifest.modules)
            first = mods[0]
            await refused(
                join(changed(base_model="other/model")), Code.FAILED_PRECONDITION, "base_model", "other/model"
            )
            await refused(join(changed(modules=mods[1:])), Code.FAILED_PRECONDITION, first.name, "missing")
            extra = pb.Module(name="base_model.model.lm_head", out_features=64, in_features=32, rank=4)
            await refused(join(changed(modules=mods + [extra])), Code.FAILED_PRECONDITION, "lm_head", "not one of")
            wide = pb.Module(
                name=first.name, out_features=first.out_features + 1, in_features=first.in_features, rank=first.rank
            )
            await refused(
                join(changed(modules=[wide] + mods[1:])),
                Code.FAILED_PRECONDITION,
                first.name,
                f"{first.out_features + 1}x",
            )
            big = pb.Module(
                name=first.name, out_features=first.out_features, in_features=first.in_features, rank=first.rank + 4
            )
            await refused(
                join(changed(modules=[big] + mods[1:])), Code.FAILED_PRECONDITION, first.name, f"rank {first.rank + 4}"
            )
            await refused(
                join(changed(upload_kind="sketch", sketch_rank=2)), Code.FAILED_PRECONDITION, "'sketch' is not allowed"
            )

            def put(data, digest=None, site="a"):
                request = pb.UploadChunkRequest(
                    federation_id="fed", site_id=site, sha256=digest or sha(data), data=data
                )
                return lambda: stub.UploadChunk(request, metadata=auth(site), timeout=10)

            await refused(put(b"x"), Code.FAILED_PRECONDITION, "Join first")
            await join(a.manifest)()
            assert (await join(a.manifest)()).federation_config_json  # the same manifest again is fine
            await refused(put(b"x" * (MAX_CHUNK + 1)), Code.INVALID_ARGUMENT, "exceeds")
            await refused(put(b"data", digest=sha(b"other")), Code.INVALID_ARGUMENT, "sha256")
            assert (await put(b"x")()).already_stored is False and (await put(b"x")()).already_stored is True

            def commit(*parts):
                return lambda: stub.Commit(
                    pb.CommitRequest(federation_id="fed", site_id="a", parts=parts), metadata=auth("a"), timeout=30
                )

            part = await upload(stub, "fed", "a", a.file, skip_last=True)
            await refused(commit(part), Code.FAILED_PRECONDITION, f"1 of {len(part.chunks)} chunks")
            part = await upload(stub, "fed", "a", a.file)
            wrong = pb.Part(name=part.name, chunks=part.chunks, sha256=sha(b"wrong"), size=part.size)
            await refused(commit(wrong), Code.INVALID_ARGUMENT, "sha256", sha(b"wrong"))
            sketch = await upload(stub, "fed", "a", world.sites["b"].file)  # a's own chunks, the wrong kind
            await refused(commit(sketch), Code.INVALID_ARGUMENT, "payload kind 'sketch'")
            download = pb.DownloadRequest(federation_id="fed", site_id="a")
            await refused(
                lambda: stub.DownloadBasis(download, metadata=auth("a"), timeout=5).read(),
                Code.FAILED_PRECONDITION,
                "not DONE",
            )
            await commit(part)()
            await commit(part)()  # the same parts again is fine
            await refused(commit(sketch), Code.FAILED_PRECONDITION, "already committed")
            await refused(join(changed(tasks=["renamed"])), Code.FAILED_PRECONDITION, "already committed")

    asyncio.run(main())


def test_tls_and_mutual_tls(world, tmp_path):
    certs = make_dev_certs(tmp_path / "certs", ["a", "b"])
    read = lambda key: certs[key].read_bytes()  # noqa: E731
    tls = TLSConfig(cert=certs["server_cert"], key=certs["server_key"])
    mtls = TLSConfig(cert=certs["server_cert"], key=certs["server_key"], client_ca=certs["ca_cert"])
    fed = federation(world, sites="ab")
    assert certs["a_key"].stat().st_mode & 0o777 == 0o600

    async def main():
        plain = coordinator_config(tmp_path / "tls", fed, insecure=False, tls=tls)
        async with serving(plain, grpc.ssl_channel_credentials(read("ca_cert")), target="localhost") as (stub, _, _):
            assert (await status(stub, "a")).state == "OPEN"
        mutual = coordinator_config(tmp_path / "mtls", fed, insecure=False, tls=mtls)
        async with serving(mutual, grpc.ssl_channel_credentials(read("ca_cert"), read("a_key"), read("a_cert"))) as (
            stub,
            _,
            port,
        ):
            assert (await status(stub, "a")).state == "OPEN"
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", grpc.ssl_channel_credentials(read("ca_cert"))
            ) as anonymous:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await status(pb_grpc.FederationStub(anonymous), "a")
                assert e.value.code() == Code.UNAVAILABLE
            as_b = grpc.ssl_channel_credentials(read("ca_cert"), read("b_key"), read("b_cert"))
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", as_b) as other:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await status(pb_grpc.FederationStub(other), "a")  # a's token, b's certificate
                assert e.value.code() == Code.PERMISSION_DENIED and "common name (b)" in e.value.details()

    asyncio.run(main())


def test_restart_keeps_every_acknowledged_upload(world, tmp_path):
    config = coordinator_config(tmp_path / "state", federation(world))
    c = world.sites["c"]
    fed_dir = tmp_path / "state" / "fed"

    async def main():
        async with serving(config) as (stub, _, _):
            parts = {s: await join_and_commit(stub, world, s) for s in "ab"}
            await stub.Join(
                pb.JoinRequest(federation_id="fed", site_id="c", manifest=c.manifest), metadata=auth("c"), timeout=10
            )
            part_c = await upload(stub, "fed", "c", c.file, skip_last=True)
        # What a coordinator killed mid-write leaves behind: a half-written chunk, a commit's staging.
        site_c = tmp_path / "state" / "fed" / "sites" / "c"
        (site_c / "chunks" / f".{part_c.chunks[-1]}.1234.tmp").write_bytes(b"half")
        (site_c / ".commit-1234").mkdir()
        (site_c / ".commit-1234" / "c.safetensors").write_bytes(b"half")
        async with serving(config) as (stub, _, _):
            assert not list(site_c.rglob(".*"))
            for site, part in parts.items():
                ask = pb.MissingChunksRequest(federation_id="fed", site_id=site, sha256=part.chunks)
                assert list((await stub.MissingChunks(ask, metadata=auth(site), timeout=10)).sha256) == []
            ask = pb.MissingChunksRequest(federation_id="fed", site_id="c", sha256=part_c.chunks)
            assert list((await stub.MissingChunks(ask, metadata=auth("c"), timeout=10)).sha256) == part_c.chunks[-1:]
            waiting_c = await status(stub, "c")
            # Traffic is saved at each stage's end: a's commit is one, c's unfinished upload not yet.
            a_row = json.loads(
                (
                    await stub.Report(
                        pb.ReportRequest(federation_id="fed", site_id="a"), metadata=auth("a"), timeout=10
                    )
                ).json
            )
            assert a_row["sites"]["a"]["bytes_received"] == world.sites["a"].file.stat().st_size
            assert not (site_c / "traffic.json").exists()
            assert waiting_c.committed_sites == [] and "2 of 3 sites committed" in waiting_c.message
            assert "a" not in waiting_c.message.split() and "b" not in waiting_c.message.split()
            await join_and_commit(stub, world, "c")
            done = await status(stub, "c", wait=30)
        # A coordinator killed mid-aggregation (phase CLOSING, no result yet) aggregates on start.
        shutil.rmtree(fed_dir / "result")
        phase = json.loads((fed_dir / "phase.json").read_text())
        (fed_dir / "phase.json").write_text(
            json.dumps(phase | {"phase": "CLOSING", "message": "aggregating 3 sites", "finished": None})
        )
        async with serving(config) as (stub, _, _):
            again = await status(stub, "a", wait=30)
        return done, again

    done, again = asyncio.run(main())
    assert done.state == "DONE" and done.committed_sites == ["c"], done.message
    result = json.loads((tmp_path / "state" / "fed" / "result" / "result.json").read_text())
    assert len(result["tasks"]) == 5
    assert (again.state, again.basis_sha256) == ("DONE", done.basis_sha256)
    changed = coordinator_config(tmp_path / "state", federation(world, min_sites=2))
    with pytest.raises(RMMError, match="min_sites: 1 then, 2 now"):
        asyncio.run(Coordinator(changed).start())
    (fed_dir / "phase.json").unlink()  # the state directory of a coordinator before phase.json
    with pytest.raises(RMMError, match="older coordinator"):
        asyncio.run(Coordinator(config).start())


def test_deadline_closes_with_or_without_quorum(world, tmp_path):
    deadline = 2.0
    quorum = federation(world, "quorum", min_sites=2, deadline_seconds=deadline)
    lonely = federation(world, "lonely", min_sites=2, deadline_seconds=deadline)

    async def main():
        async with serving(coordinator_config(tmp_path / "state", quorum, lonely)) as (stub, _, _):
            started = time.monotonic()
            await asyncio.gather(
                join_and_commit(stub, world, "a", "quorum"), join_and_commit(stub, world, "b", "quorum")
            )
            await join_and_commit(stub, world, "a", "lonely")
            assert time.monotonic() - started < deadline, "commits took longer than the deadline; raise it"
            done = await status(stub, "a", "quorum", wait=30)
            closed_after = time.monotonic() - started
            failed = await status(stub, "a", "lonely", wait=30)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await join_and_commit(stub, world, "c", "lonely")
        return done, closed_after, failed, late.value

    done, closed_after, failed, late = asyncio.run(main())
    assert done.state == "DONE" and done.committed_sites == ["a"], done.message
    assert closed_after >= deadline - 0.5  # it waited for c until the deadline (measured from start)
    result = json.loads((tmp_path / "state" / "quorum" / "result" / "result.json").read_text())
    assert result["sites"] == ["a", "b"] and len(result["tasks"]) == 3
    assert failed.state == "FAILED"
    assert failed.message == "deadline passed: 1 of min_sites=2 sites committed"
    assert late.code() == Code.FAILED_PRECONDITION and "no more joins" in late.details()


def test_deadline_counts_from_the_first_start_across_restarts(world, tmp_path):
    """A restart does not reset the deadline: the federation closes `deadline_seconds` after its first start."""
    deadline = 4.0
    config = coordinator_config(tmp_path / "state", federation(world, sites="ab", deadline_seconds=deadline))

    async def main():
        started = time.monotonic()
        async with serving(config) as (stub, _, _):
            await join_and_commit(stub, world, "a")
            first = json.loads(
                (
                    await stub.Report(
                        pb.ReportRequest(federation_id="fed", site_id="a"), metadata=auth("a"), timeout=10
                    )
                ).json
            )
        await asyncio.sleep(max(0.0, started + deadline / 2 - time.monotonic()))
        async with serving(config) as (stub, _, _):  # restarted halfway to the deadline; b never commits
            again = json.loads(
                (
                    await stub.Report(
                        pb.ReportRequest(federation_id="fed", site_id="a"), metadata=auth("a"), timeout=10
                    )
                ).json
            )
            done = await status(stub, "a", wait=3 * deadline)
        return first, again, done, time.monotonic() - started

    first, again, done, closed_after = asyncio.run(main())
    assert done.state == "DONE" and done.message == "aggregated 1 tasks of 1 sites", done.message
    assert (again["created"], again["deadline"]) == (first["created"], first["deadline"])
    # Closed at the first start's deadline (not deadline_seconds after the restart, at 1.5 x deadline).
    assert deadline - 0.5 <= closed_after < 1.25 * deadline, closed_after


@pytest.fixture(scope="module")
def two_sites(adapters, world, tmp_path_factory):
    """Method auto: two sites' shards, spectra payloads and manifests."""
    root = tmp_path_factory.mktemp("spectra")
    opened = [open_adapter(p) for p in adapters]
    shards = {"a": opened[:2], "b": opened[2:]}
    spectra, manifests = {}, {}
    for site, shard in shards.items():
        spectra[site] = root / f"{site}.safetensors"
        write_spectra(shard, world.specs, spectra[site])
        manifests[site] = pb.SiteManifest(
            base_model=world.base_model,
            modules=world.sites["a"].manifest.modules,
            tasks=[a.name for a in shard],
            upload_kind="spectra",
            lora_numbers=numbers_original(shard),
            tool_version="test",
        )
    return SimpleNamespace(shards=shards, spectra=spectra, manifests=manifests)


async def commit_file(stub, site, file):
    part = await upload(stub, "fed", site, file)
    await stub.Commit(
        pb.CommitRequest(federation_id="fed", site_id=site, parts=[part]), metadata=auth(site), timeout=30
    )


async def curves_of(stub, world, two_sites, site, tmp_path):
    """Download the bases (state CURVES) and write the site's curves against them."""
    bases = tmp_path / f"bases-{site}.safetensors"
    bases.write_bytes(await download(stub, site))
    file = tmp_path / f"curves-{site}.safetensors"
    write_curves(two_sites.shards[site], world.specs, bases, file)
    return file


async def spectra_round(stub, two_sites) -> None:
    """Method auto's first round: both sites join and commit their spectra."""
    for site in "ab":
        await stub.Join(
            pb.JoinRequest(federation_id="fed", site_id=site, manifest=two_sites.manifests[site]),
            metadata=auth(site),
            timeout=10,
        )
        await commit_file(stub, site, two_sites.spectra[site])


def test_auto_rounds_survive_a_restart_and_refuse_uploads_out_of_turn(adapters, world, two_sites, tmp_path):
    """Method auto: spectra -> CURVES (bases served) -> curves -> DONE with the centralised plan, across
    a coordinator restart between the two sites' curves. The config leaves the budget at its default, as `rmm merge`
    does."""
    shards, spectra, manifests = two_sites.shards, two_sites.spectra, two_sites.manifests
    fed = federation(world, sites="ab", merge=MergeOptions(), upload_kinds=None)
    config = coordinator_config(tmp_path / "state", fed)
    commit = commit_file

    async def main():
        async with serving(config) as (stub, _, _):
            for site in "ab":
                await stub.Join(
                    pb.JoinRequest(federation_id="fed", site_id=site, manifest=manifests[site]),
                    metadata=auth(site),
                    timeout=10,
                )
            wrong = world.sites["a"].manifest
            with pytest.raises(grpc.aio.AioRpcError, match="method auto, whose sites upload 'spectra'"):
                await stub.Join(
                    pb.JoinRequest(federation_id="fed", site_id="a", manifest=wrong), metadata=auth("a"), timeout=10
                )
            with pytest.raises(grpc.aio.AioRpcError, match="FAILED_PRECONDITION|not DONE"):
                await download(stub, "a")  # nothing to download while OPEN
            for site in "ab":
                await commit(stub, site, spectra[site])
            curves_state = await status(stub, "a", wait=30)
            # Round 2: a's spectra again are "the same commit"; spectra as curves are refused.
            await commit(stub, "a", spectra["a"])
            with pytest.raises(grpc.aio.AioRpcError, match="this upload takes 'curves'"):
                await commit(stub, "a", spectra["b"])
            await commit(stub, "a", await curves_of(stub, world, two_sites, "a", tmp_path))
            waiting = await status(stub, "a", wait=0.5)  # a's curves are in: it waits for b
        async with serving(config) as (stub, _, _):  # restarted between the two sites' curves
            resumed = await status(stub, "b")
            await commit(stub, "b", await curves_of(stub, world, two_sites, "b", tmp_path))
            done = await status(stub, "b", wait=30)
            basis = await download(stub, "a")
        return curves_state, waiting, resumed, done, basis

    curves_state, waiting, resumed, done, basis = asyncio.run(main())
    assert curves_state.state == "CURVES" and waiting.state == "CURVES" and resumed.state == "CURVES", (
        curves_state.message
    )
    assert "waiting for the curves of 1 of 2 sites" in resumed.message
    assert done.state == "DONE", done.message
    (tmp_path / "basis.safetensors").write_bytes(basis)
    central = merge(adapters, tmp_path / "central", MergeOptions(), progress=False)
    for i, shard in shards.items():
        site = merge(
            [a.path for a in shard],
            tmp_path / f"site-{i}",
            MergeOptions(),
            basis=tmp_path / "basis.safetensors",
            progress=False,
        )
        for a in shard:
            for name, err in site.report.errors[a.name].items():
                assert err == pytest.approx(central.report.errors[a.name][name], rel=1e-4, abs=1e-6)
    assert [m.method for m in site.modules] == [m.method for m in central.modules]


def test_auto_fails_at_the_deadline_of_its_second_round(world, two_sites, tmp_path):
    """A site that sent its spectra but never its curves: the federation fails (the log names it, sites see a count)."""
    fed = federation(
        world, sites="ab", merge=MergeOptions(storage_ratio=0.5), upload_kinds=None, deadline_seconds=8, min_sites=2
    )
    config = coordinator_config(tmp_path / "state", fed)

    async def main():
        async with serving(config) as (stub, _, _):
            await spectra_round(stub, two_sites)
            assert (await status(stub, "a", wait=10)).state == "CURVES"
            await commit_file(stub, "a", await curves_of(stub, world, two_sites, "a", tmp_path))
            return await status(stub, "a", wait=25)

    final = asyncio.run(main())
    assert final.state == "FAILED" and "without the curves of 1 of 2 sites" in final.message, final.message


def test_calibration_round_resumes_after_a_restart_and_refuses_bad_sums(world, two_sites, tmp_path):
    """Method auto with calibrate: spectra -> curves -> CALIBRATE (every candidate plan's basis served) -> each site's
    divergence per candidate, summed over its tasks -> DONE with the least total, across a coordinator restart between
    the two sites' sums. Sums that are not one finite number >= 0 per candidate, exactly, are refused."""
    fed = federation(world, sites="ab", merge=MergeOptions(storage_ratio=0.5), upload_kinds=None, calibrate=True)
    config = coordinator_config(tmp_path / "state", fed)
    manifests = {site: _manifest(m, calibration=True) for site, m in two_sites.manifests.items()}
    tasks = {site: [a.name for a in shard] for site, shard in two_sites.shards.items()}

    def sums(site: str, values: dict) -> Path:
        file = tmp_path / f"sums-{site}-{len(list(tmp_path.glob('sums-*')))}.safetensors"
        write_divergences(values, tasks[site], file)
        return file

    async def main():
        async with serving(config) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError, match="chooses its plan by calibration: run the site with --base"):
                await stub.Join(
                    pb.JoinRequest(federation_id="fed", site_id="a", manifest=two_sites.manifests["a"]),
                    metadata=auth("a"),
                    timeout=10,
                )
            for site in "ab":
                await stub.Join(
                    pb.JoinRequest(federation_id="fed", site_id=site, manifest=manifests[site]),
                    metadata=auth(site),
                    timeout=10,
                )
                await commit_file(stub, site, two_sites.spectra[site])
            assert (await status(stub, "a", wait=30)).state == "CURVES"
            for site in "ab":
                await commit_file(stub, site, await curves_of(stub, world, two_sites, site, tmp_path))
            calibrating = await status(stub, "a", wait=30)
            (tmp_path / "candidates.safetensors").write_bytes(await download(stub, "a"))
            bases = split_candidates(tmp_path / "candidates.safetensors", tmp_path / "split")
            names = list(bases)
            good = {name: 0.5 + 0.01 * i for i, name in enumerate(names)}
            bad = [
                ({**good, names[0]: float("nan")}, "finite"),
                ({**good, names[-1]: -1e-3}, ">= 0"),
                ({k: v for k, v in good.items() if k != names[-1]}, f"missing {names[-1]}"),
                ({**good, "other": 0.0}, "not a candidate"),
            ]
            for values, why in bad:
                with pytest.raises(grpc.aio.AioRpcError, match=why):
                    await commit_file(stub, "a", sums("a", values))
            await commit_file(stub, "a", sums("a", good))
            waiting = await status(stub, "a", wait=0.5)
        async with serving(config) as (stub, _, _):  # restarted between the two sites' sums
            resumed = await status(stub, "b")
            last = {name: 1.0 - 0.1 * i for i, name in enumerate(names)}  # the last candidate's total is the least
            await commit_file(stub, "b", sums("b", last))
            done = await status(stub, "b", wait=30)
            basis = await download(stub, "b")
            report = json.loads(
                (await stub.Report(pb.ReportRequest(federation_id="fed", site_id="b"), metadata=auth("b"))).json
            )
        return calibrating, waiting, resumed, done, basis, bases, good, last, report

    calibrating, waiting, resumed, done, basis, bases, good, last, report = asyncio.run(main())
    assert len(bases) >= 2 and calibrating.state == waiting.state == resumed.state == "CALIBRATE", calibrating.message
    assert "waiting for the divergences of 1 of 2 sites" in resumed.message and not resumed.uploaded
    assert done.state == "DONE", done.message
    names = list(bases)
    assert basis == bases[names[-1]].read_bytes()  # the chosen candidate's basis, as the sites measured it
    result = json.loads((tmp_path / "state" / "fed" / "result" / "result.json").read_text())
    assert result["calibration"]["chosen"] == names[-1]
    assert result["calibration"]["totals"] == pytest.approx({n: good[n] + last[n] for n in names}, rel=1e-12)
    with open_safetensors(bases[names[-1]]) as f:
        assert result["modules"] == json.loads(f.metadata()[PLAN])
    assert report["calibration"] == {"chosen": names[-1], "candidates": names}
    with pytest.raises(ValueError, match="calibrate chooses among method auto's plans"):
        federation(world, merge=MergeOptions(basis_size=2), calibrate=True)


def _manifest(base: pb.SiteManifest, **fields) -> pb.SiteManifest:
    """A copy of `base` with some fields replaced (repeated fields whole)."""
    m = pb.SiteManifest()
    m.CopyFrom(base)
    for key, value in fields.items():
        if isinstance(value, list):
            del getattr(m, key)[:]
            getattr(m, key).extend(value)
        else:
            setattr(m, key, value)
    return m


def test_each_site_learns_only_about_itself_within_its_quotas(world, tmp_path):
    """No site's name, tasks or traffic reach another site; task names are file names; quotas hold;
    a 20,000-task join is linear."""
    state_dir = tmp_path / "state"
    fed = federation(world, max_pending_bytes=2 * CHUNK + 10, max_tasks=20_000)
    a, b = world.sites["a"], world.sites["b"]

    async def main():
        async with serving(coordinator_config(state_dir, fed)) as (stub, _, _):

            async def refused(site, manifest=None, chunk=None):
                before = snapshot(state_dir)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    if chunk is None:
                        await stub.Join(
                            pb.JoinRequest(federation_id="fed", site_id=site, manifest=manifest),
                            metadata=auth(site),
                            timeout=10,
                        )
                    else:
                        request = pb.UploadChunkRequest(
                            federation_id="fed", site_id=site, sha256=sha(chunk), data=chunk
                        )
                        await stub.UploadChunk(request, metadata=auth(site), timeout=10)
                assert snapshot(state_dir) == before
                return e.value

            await stub.Join(
                pb.JoinRequest(federation_id="fed", site_id="a", manifest=a.manifest), metadata=auth("a"), timeout=10
            )
            taken = await refused("b", _manifest(b.manifest, tasks=[*b.manifest.tasks, a.manifest.tasks[0]]))
            names = [
                await refused("b", _manifest(b.manifest, tasks=[name]))
                for name in ("", "a\nb", "../../etc/passwd", "x" * 200)
            ]
            many = await refused("b", _manifest(b.manifest, tasks=[f"t{i}" for i in range(20_001)]))
            clock = time.perf_counter()
            for site in "bc":  # b's two tasks 10,000 times over
                manifest = _manifest(
                    b.manifest,
                    tasks=[f"{site}{i}" for i in range(20_000)],
                    lora_numbers=10_000 * b.manifest.lora_numbers,
                )
                await stub.Join(
                    pb.JoinRequest(federation_id="fed", site_id=site, manifest=manifest),
                    metadata=auth(site),
                    timeout=10,
                )
            joins = time.perf_counter() - clock
            for i in range(2):
                data = bytes([i]) * CHUNK
                await stub.UploadChunk(
                    pb.UploadChunkRequest(federation_id="fed", site_id="a", sha256=sha(data), data=data),
                    metadata=auth("a"),
                    timeout=10,
                )
            full = await refused("a", chunk=b"\x02" * CHUNK)
            other = bytes([3]) * CHUNK  # the quota is per site: b uploads as much again
            await stub.UploadChunk(
                pb.UploadChunkRequest(federation_id="fed", site_id="b", sha256=sha(other), data=other),
                metadata=auth("b"),
                timeout=10,
            )
            report = json.loads(
                (
                    await stub.Report(
                        pb.ReportRequest(federation_id="fed", site_id="b"), metadata=auth("b"), timeout=10
                    )
                ).json
            )
        return taken, names, many, joins, full, report

    taken, names, many, joins, full, report = asyncio.run(main())
    assert taken.code() == Code.FAILED_PRECONDITION and "already held by another site" in taken.details()
    assert "site a" not in taken.details() and " a;" not in taken.details()
    for e in names:
        assert e.code() == Code.INVALID_ARGUMENT and "cannot be used as a file name" in e.details(), e.details()
    assert many.code() == Code.RESOURCE_EXHAUSTED and "max_tasks" in many.details()
    assert joins < 1.0, f"two 20,000-task joins took {joins:.2f} s"
    assert full.code() == Code.RESOURCE_EXHAUSTED and "max_pending_bytes" in full.details()
    assert list(report["sites"]) == ["b"] and report["sites"]["b"]["tasks"] == 20_000
    assert report["sites"]["b"]["bytes_received"] == CHUNK


def test_acknowledged_curves_chunks_survive_a_restart(world, two_sites, tmp_path):
    """Method auto: curves chunks acknowledged before a restart are still held after it; the commit
    needs no re-upload."""
    fed = federation(world, sites="ab", merge=MergeOptions(storage_ratio=0.6), upload_kinds=None)
    config = coordinator_config(tmp_path / "state", fed)

    async def main():
        async with serving(config) as (stub, _, _):
            await spectra_round(stub, two_sites)
            assert (await status(stub, "a", wait=30)).state == "CURVES"
            curves = await curves_of(stub, world, two_sites, "a", tmp_path)
            part = await upload(stub, "fed", "a", curves)
            stale = b"a chunk of an upload the site abandoned"
            await stub.UploadChunk(
                pb.UploadChunkRequest(federation_id="fed", site_id="a", sha256=sha(stale), data=stale),
                metadata=auth("a"),
                timeout=10,
            )
        async with serving(config) as (stub, _, _):
            ask = pb.MissingChunksRequest(federation_id="fed", site_id="a", sha256=part.chunks)
            missing = list((await stub.MissingChunks(ask, metadata=auth("a"), timeout=10)).sha256)
            await stub.Commit(
                pb.CommitRequest(federation_id="fed", site_id="a", parts=[part]), metadata=auth("a"), timeout=30
            )
            return missing, await status(stub, "a")

    missing, after = asyncio.run(main())
    assert missing == [] and after.state == "CURVES" and "waiting for the curves of 1 of 2 sites" in after.message
    assert not list(
        (tmp_path / "state" / "fed" / "sites" / "a" / "chunks").iterdir()
    )  # the commit ends the round's uploads


def test_lora_numbers_are_checked_not_trusted(world, two_sites, tmp_path):
    """A site cannot set the federation's budget: lora_numbers outside what its modules and task count
    allow is refused at Join; under method auto, any value other than what its spectra's ranks give is
    refused at commit."""
    fed = federation(world, sites="ab", merge=MergeOptions(storage_ratio=0.6), upload_kinds=None)
    manifest = two_sites.manifests["a"]
    true = manifest.lora_numbers

    async def main():
        async with serving(coordinator_config(tmp_path / "state", fed)) as (stub, _, _):

            def join(numbers):
                m = _manifest(manifest, lora_numbers=numbers)
                return stub.Join(
                    pb.JoinRequest(federation_id="fed", site_id="a", manifest=m), metadata=auth("a"), timeout=10
                )

            out = []
            for numbers in (10**12, 1):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await join(numbers)
                out.append(e.value)
            await join(true - 1)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await commit_file(stub, "a", two_sites.spectra["a"])
            out.append(e.value)
            await join(true)
            await commit_file(stub, "a", two_sites.spectra["a"])
            return out

    big, small, off = asyncio.run(main())
    for e in (big, small):
        assert e.code() == Code.INVALID_ARGUMENT and "lora_numbers" in e.details(), e.details()
    assert (
        off.code() == Code.INVALID_ARGUMENT
        and f"lora_numbers {true - 1}" in off.details()
        and str(true) in off.details()
    ), off.details()
