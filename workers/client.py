"""A site's gRPC client for the coordinator: join, resumable chunked upload, commit, wait, download, publish.

Every call is idempotent (see protos/rmm/v1/federation.proto) and carries the site's bearer token
and a deadline. A call the coordinator could not take (it is restarting or unreachable, the
connection dropped) is repeated under `Retry` (protos/rmm/v1/wire.py), the one bound on how long a
site waits for it; gRPC's own retries cannot do this for uploads, as they buffer at most 256 KiB of
a call. Uploads ask the coordinator which chunks it lacks first, so a dropped connection or a
restarted coordinator never costs an acknowledged chunk twice; downloads resume from the bytes
already on disk. Any other failure is an RMMError carrying the coordinator's message."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos.rmm.v1 import federation_pb2 as pb
from protos.rmm.v1 import federation_pb2_grpc as pb_grpc
from protos.rmm.v1.wire import MAX_CHUNK, MESSAGE_LIMITS, Retry
from rmm.errors import RMMError
from rmm.io import sha256_file


@dataclass(frozen=True)
class Credentials:
    """How a site reaches the coordinator: its token and, unless insecure, TLS material (PEM files)."""

    token: str
    ca: Path | None = None  # the CA that signed the coordinator's certificate
    cert: Path | None = None  # the site's client certificate (mutual TLS)
    key: Path | None = None
    insecure: bool = False  # plaintext, for loopback development only


@dataclass
class Traffic:
    bytes_sent: int = 0  # chunk payload bytes uploaded
    chunks_sent: int = 0
    chunks_skipped: int = 0  # already held by the coordinator
    bytes_received: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class FederationClient:
    def __init__(
        self,
        address: str,
        federation_id: str,
        site_id: str,
        credentials: Credentials,
        *,
        timeout: float = 60.0,
        chunk_size: int = MAX_CHUNK,
        retry: Retry = Retry(),
    ):
        if not 0 < chunk_size <= MAX_CHUNK:
            raise RMMError(f"chunk size must be between 1 and {MAX_CHUNK} bytes, got {chunk_size}")
        self.address, self.federation_id, self.site_id = address, federation_id, site_id
        self.timeout, self.chunk_size, self.retry = timeout, chunk_size, retry
        options = [
            *MESSAGE_LIMITS,
            # Reconnect to a restarted coordinator within a second or two, not gRPC's default of up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if credentials.insecure:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            tls = grpc.ssl_channel_credentials(_read(credentials.ca), _read(credentials.key), _read(credentials.cert))
            self.channel = grpc.secure_channel(address, tls, options=options)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {credentials.token}"),)
        self.traffic = Traffic()

    def close(self) -> None:
        self.channel.close()

    def _call(self, name: str, request, timeout: float | None = None):
        method = getattr(self.stub, name)
        attempt = lambda: method(request, timeout=timeout or self.timeout, metadata=self.metadata)  # noqa: E731
        return self.retry.run(f"coordinator {self.address}: {name}", attempt)

    def _ids(self) -> dict:
        return {"federation_id": self.federation_id, "site_id": self.site_id}

    def join(self, manifest: pb.SiteManifest) -> dict:
        response = self._call("Join", pb.JoinRequest(manifest=manifest, **self._ids()))
        return json.loads(response.federation_config_json)

    def upload(self, file: Path, name: str) -> pb.Part:
        """Send the chunks of `file` the coordinator does not hold yet; returns the part to commit."""
        hashes, whole = [], hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(self.chunk_size), b""):
                hashes.append(hashlib.sha256(block).hexdigest())
                whole.update(block)
        missing = set()
        for i in range(0, len(hashes), 1000):  # keep each query message small
            request = pb.MissingChunksRequest(sha256=hashes[i : i + 1000], **self._ids())
            missing.update(self._call("MissingChunks", request).sha256)
        with open(file, "rb") as f:
            for digest in hashes:
                block = f.read(self.chunk_size)
                if digest not in missing:
                    self.traffic.chunks_skipped += 1
                    continue
                self._call("UploadChunk", pb.UploadChunkRequest(sha256=digest, data=block, **self._ids()))
                missing.discard(digest)  # a repeated chunk (same bytes) goes once
                self.traffic.bytes_sent += len(block)
                self.traffic.chunks_sent += 1
        return pb.Part(name=name, chunks=hashes, sha256=whole.hexdigest(), size=file.stat().st_size)

    def commit(self, parts: list[pb.Part]) -> None:
        self._call("Commit", pb.CommitRequest(parts=parts, **self._ids()))

    def publish(self, tasks: list[pb.PublishedTask]) -> None:
        """Hand the coordinator these tasks' coefficients (their parts uploaded with `upload` first)."""
        self._call("Publish", pb.PublishRequest(tasks=tasks, **self._ids()))

    def status(self) -> pb.StatusResponse:
        return self._call("Status", pb.StatusRequest(**self._ids()))

    def wait(self, timeout: float, states: tuple[str, ...] = ("DONE", "FAILED")) -> pb.StatusResponse:
        """Block until the federation is in one of `states` (polling in bounded calls) or `timeout` passes."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            step = max(0.1, min(left, 20.0))
            status = self._call(
                "Status", pb.StatusRequest(wait=True, timeout_seconds=step, **self._ids()), timeout=step + 30
            )
            if status.state in states or left <= 0:
                return status

    def download(self, file: Path, state: str = "DONE") -> Path:
        """The basis (DONE) or, with state CURVES, the bases of method auto's first round into `file`,
        resuming a partial download; checked chunk by chunk and whole."""
        status = self.status()
        if status.state != state:
            raise RMMError(f"federation {self.federation_id} is {status.state}, not {state}: {status.message}")
        partial = file.with_name(file.name + ".part")

        def resume() -> None:  # from the bytes already on disk
            offset = partial.stat().st_size if partial.exists() else 0
            with open(partial, "ab") as out:
                request = pb.DownloadRequest(offset=offset, **self._ids())
                for chunk in self.stub.DownloadBasis(request, timeout=self.timeout, metadata=self.metadata):
                    if chunk.offset != offset or hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
                        raise RMMError(f"corrupt basis chunk at offset {chunk.offset}", file=partial)
                    out.write(chunk.data)
                    offset += len(chunk.data)
                    self.traffic.bytes_received += len(chunk.data)

        self.retry.run(f"coordinator {self.address}: DownloadBasis", resume)
        digest = sha256_file(partial)
        if digest != status.basis_sha256:
            partial.unlink()
            raise RMMError(
                f"downloaded basis sha256 {digest} differs from the coordinator's {status.basis_sha256}", file=file
            )
        partial.replace(file)
        return file

    def report(self) -> dict:
        return json.loads(self._call("Report", pb.ReportRequest(**self._ids())).json)


def _read(file: Path | None) -> bytes | None:
    try:
        return Path(file).read_bytes() if file else None
    except OSError as e:
        raise RMMError(f"cannot read TLS file ({e.strerror})", file=file) from None
