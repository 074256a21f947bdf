"""Malformed messages to every RPC of a real coordinator on 127.0.0.1 (hypothesis, bounded).

Every call gets a proper gRPC status (never INTERNAL or UNKNOWN, never an exception in the
coordinator's log), and a refused call leaves the state directory byte for byte as it was. One
federation is OPEN (site a joined, chunks uploaded), the other DONE, so the calls reach past the
first checks: random field values, bad sha256, oversized names, wrong federation / site ids and
tokens, empty and duplicate parts, random bytes as chunks, bogus offsets.
"""

from __future__ import annotations

import hashlib
import logging

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_coordinator import _manifest

from coordinator.config import CoordinatorConfig, FederationConfig, Site, token_hash
from protos.rmm.v1 import federation_pb2 as pb, federation_pb2_grpc as pb_grpc
from rmm.adapter import open_adapters
from rmm.merge import module_specs, numbers_original
from rmm.payload import write_payload
from workers.client import Credentials, FederationClient
from workers.simulate import BackgroundCoordinator

CHUNK = 4096


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


class Errors(logging.Handler):
    """Collects what the coordinator logs at ERROR (log.exception: an unexpected exception)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def served(adapters, tmp_path):
    """A coordinator with an OPEN federation (a joined, chunks uploaded) and a DONE one (a committed)."""
    opened = open_adapters(adapters)
    specs = module_specs(opened)
    manifest = pb.SiteManifest(
        base_model=opened[0].base_model,
        tasks=[a.name for a in opened],
        upload_kind="moments",
        lora_numbers=numbers_original(opened),
        modules=[
            pb.Module(name=m.name, out_features=m.out_features, in_features=m.in_features, rank=m.rank) for m in specs
        ],
    )
    sites = {s: Site(token_sha256=token_hash(f"token-{s}")) for s in "ab"}
    feds = [
        FederationConfig(
            id="open", base_model=manifest.base_model, modules=specs, merge={"basis_size": 2}, sites=sites
        ),
        FederationConfig(
            id="done", base_model=manifest.base_model, modules=specs, merge={"basis_size": 2}, sites={"a": sites["a"]}
        ),
    ]
    state = tmp_path / "state"
    errors = Errors()
    logging.getLogger("coordinator").addHandler(errors)
    coordinator = BackgroundCoordinator(CoordinatorConfig(port=0, state_dir=state, insecure=True, federations=feds))
    address = f"127.0.0.1:{coordinator.port}"
    payload = tmp_path / "payload.safetensors"
    write_payload(opened, specs, payload, "moments")
    parts = {}
    for fed in ("open", "done"):
        client = FederationClient(
            address, fed, "a", Credentials(token="token-a", insecure=True), chunk_size=CHUNK, timeout=10
        )
        client.join(manifest)
        parts[fed] = client.upload(payload, "a-0")
        if fed == "done":
            client.commit([parts[fed]])
            assert client.wait(30).state == "DONE"
        client.close()
    channel = grpc.insecure_channel(address)
    try:
        yield pb_grpc.FederationStub(channel), state, manifest, parts["open"], errors
    finally:
        channel.close()
        coordinator.stop()
        logging.getLogger("coordinator").removeHandler(errors)


# -- strategies ------------------------------------------------------------------------------------

names = st.one_of(st.sampled_from(["a", "b", "a-0", "", ".", "..", "../x", "a\nb", "x" * 300]), st.text(max_size=40))
# Who calls: mostly a real site with its own token (so calls get past authentication), else anything.
_sites = st.sampled_from(
    [("open", "a", "token-a"), ("done", "a", "token-a"), ("open", "b", "token-b"), ("done", "b", "token-b")]
)
callers = st.one_of(
    _sites,
    _sites,
    _sites,
    st.tuples(
        st.one_of(st.sampled_from(["open", "done"]), st.text(max_size=70)),
        st.one_of(st.sampled_from(["a", "b"]), st.text(max_size=70)),
        st.one_of(
            st.sampled_from(["token-a", "token-b"]),
            st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
        ),
    ),
)
int64 = st.integers(-(2**63), 2**63 - 1)
digests = st.one_of(
    st.sampled_from(["", "../chunk", "a/b", "0" * 64, "0" * 63, "0" * 65, "x" * 300]),
    st.binary(max_size=8).map(sha),
    st.text(max_size=70),
    st.binary(min_size=32, max_size=32).map(lambda b: b.hex().upper()),
)


def parts(known: pb.Part):
    random = st.builds(pb.Part, name=names, chunks=st.lists(digests, max_size=4), sha256=digests, size=int64)
    # The real part, with one thing wrong (or nothing), or a duplicate of it.
    mutated = st.sampled_from(["name", "chunks", "sha256", "size", "reversed", "none"]).map(
        lambda what: _mutate_part(known, what)
    )
    return st.one_of(random, mutated)


def _mutate_part(known: pb.Part, what: str) -> pb.Part:
    p = pb.Part()
    p.CopyFrom(known)
    if what == "name":
        p.name = "../" + p.name
    elif what == "chunks":
        p.chunks.append(sha(b"not uploaded"))
    elif what == "sha256":
        p.sha256 = sha(b"other")
    elif what == "size":
        p.size += 1
    elif what == "reversed":
        p.chunks.reverse()
    return p


def manifests(valid: pb.SiteManifest):
    module = st.builds(pb.Module, name=names, out_features=int64, in_features=int64, rank=int64)
    field = st.one_of(
        st.tuples(st.just("base_model"), st.text(max_size=30)),
        st.tuples(st.just("modules"), st.lists(module, max_size=3)),
        st.tuples(st.just("tasks"), st.lists(names, max_size=4)),
        st.tuples(
            st.just("upload_kind"),
            st.one_of(st.sampled_from(["moments", "sketch", "factors", "spectra"]), st.text(max_size=10)),
        ),
        st.tuples(st.just("sketch_rank"), int64),
        st.tuples(st.just("lora_numbers"), int64),
        st.tuples(st.just("canonicalize"), st.booleans()),
    )
    return st.lists(field, max_size=3).map(lambda changes: _manifest(valid, **dict(changes)))


def calls(manifest: pb.SiteManifest, part: pb.Part):
    """(rpc name, request) pairs for every RPC."""
    chunk = st.one_of(
        st.binary(max_size=2 * CHUNK).map(lambda d: (d, sha(d))), st.tuples(st.binary(max_size=64), digests)
    )
    published = st.builds(
        pb.PublishedTask,
        name=st.one_of(st.sampled_from(list(manifest.tasks)), names),
        task_json=st.one_of(st.text(max_size=40), st.just("{}")),
        coefficients=parts(part),
        extras=parts(part),
    )
    return st.one_of(
        st.tuples(st.just("Join"), manifests(manifest).map(lambda m: {"manifest": m})),
        st.tuples(st.just("MissingChunks"), st.lists(digests, max_size=5).map(lambda d: {"sha256": d})),
        st.tuples(st.just("UploadChunk"), chunk.map(lambda c: {"data": c[0], "sha256": c[1]})),
        st.tuples(st.just("Commit"), st.lists(parts(part), max_size=3).map(lambda p: {"parts": p})),
        st.tuples(
            st.just("Status"),
            st.fixed_dictionaries(
                {"wait": st.booleans(), "timeout_seconds": st.one_of(st.floats(max_value=0.05), st.just(float("nan")))}
            ),
        ),
        st.tuples(st.just("DownloadBasis"), st.one_of(st.integers(-5, 30_000), int64).map(lambda o: {"offset": o})),
        st.tuples(st.just("Report"), st.just({})),
        st.tuples(st.just("Publish"), st.lists(published, max_size=2).map(lambda t: {"tasks": t})),
    )


REQUESTS = {
    "Join": pb.JoinRequest,
    "MissingChunks": pb.MissingChunksRequest,
    "UploadChunk": pb.UploadChunkRequest,
    "Commit": pb.CommitRequest,
    "Status": pb.StatusRequest,
    "DownloadBasis": pb.DownloadRequest,
    "Report": pb.ReportRequest,
    "Publish": pb.PublishRequest,
}


def test_malformed_calls_get_a_status_and_change_nothing(served):
    stub, state, manifest, part, errors = served
    around = sorted(state.parent.iterdir())
    seen = {}

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(call=calls(manifest, part), caller=callers)
    def check(call, caller):
        (rpc, fields), (federation_id, site_id, token) = call, caller
        request = REQUESTS[rpc](federation_id=federation_id, site_id=site_id, **fields)
        before = snapshot(state)
        try:
            response = getattr(stub, rpc)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            if rpc == "DownloadBasis":
                list(response)
            seen.setdefault(rpc, set()).add("OK")
            # What an accepted call may be: a chunk that is what it claims, the site's real part, safe task names.
            if rpc == "UploadChunk":
                assert sha(request.data) == request.sha256
            assert rpc != "Commit" or list(request.parts) == [part], request.parts
            assert rpc != "Join" or all(
                t == t.strip() and "/" not in t and "\n" not in t and t[:1] != "." for t in request.manifest.tasks
            )
            assert rpc != "Publish"  # nothing publishable was uploaded
        except grpc.RpcError as e:
            assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (rpc, e.code(), e.details())
            assert snapshot(state) == before, (rpc, e.code(), e.details())
            seen.setdefault(rpc, set()).add(e.code().name)
        assert not errors.records, errors.records[0].getMessage()
        assert sorted(state.parent.iterdir()) == around  # nothing written beside the state directory

    check()
    assert set(seen) == set(REQUESTS), seen  # every RPC was called
    # Every RPC was also called past authentication, into its own checks.
    assert all(codes - {"UNAUTHENTICATED", "NOT_FOUND", "PERMISSION_DENIED"} for codes in seen.values()), seen
