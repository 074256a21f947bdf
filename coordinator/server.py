"""The coordinator: a grpc.aio `rmm.v1.Federation` service plus the standard health service.

Every call authenticates, validates, and only then changes state (in a worker thread, so file I/O
never stalls the event loop); a refused call changes nothing, and its transport-neutral `Reason`
becomes a gRPC status code here only. A background task closes each federation's round once every
site has uploaded, or at its deadline (phase CLOSING), and aggregates it in a worker thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import hashlib
import json
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.auth import authenticate, server_credentials
from coordinator.config import CoordinatorConfig
from coordinator.publish import Publication
from coordinator.state import FederationState, Phase, Reason, Refused
from protos.rmm.v1 import federation_pb2 as pb, federation_pb2_grpc as pb_grpc
from protos.rmm.v1.wire import MAX_CHUNK, MESSAGE_LIMITS
from rmm.errors import RMMError

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Federation"].full_name
TICK = 0.2  # seconds between deadline checks
MAX_WAIT = 30.0  # longest Status wait, so idle calls do not pin connections forever
CODES = {
    Reason.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.CONFLICT: grpc.StatusCode.ABORTED,
    Reason.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
}


def _lock_state_dir(state_dir):
    """Two coordinators writing one state directory would corrupt it: the second one refuses to start."""
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(state_dir / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RMMError(
            "another coordinator is using this state directory; stop it or choose another --state-dir",
            file=state_dir,
        ) from None
    return handle


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.federations: dict[str, FederationState] = {}
        self.publications: dict[str, Publication] = {}
        self._changed: dict[str, asyncio.Event] = {}  # set (and replaced) whenever a federation changes phase
        self._aggregating: dict[str, asyncio.Task] = {}  # per federation id, its aggregation in progress
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._ticker: asyncio.Task | None = None
        self._lock = None  # an flock on state_dir/.lock while serving

    async def start(self) -> int:
        """Open every federation's state, serve, and return the bound port (config port 0: a free one)."""
        self._lock = _lock_state_dir(self.config.state_dir)
        try:
            return await self._serve()
        except BaseException:  # e.g. a bad certificate: a coordinator that did not start holds no lock
            self._lock.close()
            self._lock = None
            raise

    async def _serve(self) -> int:
        for fed in self.config.federations:
            state = FederationState(self.config.state_dir, fed)
            self.federations[fed.id] = state
            self.publications[fed.id] = Publication(state)
            self._changed[fed.id] = asyncio.Event()
        self.close_due()  # before serving: a federation killed mid-aggregation (CLOSING) resumes first
        options = [
            *MESSAGE_LIMITS,
            ("grpc.so_reuseport", 0),  # a second coordinator on a taken port must fail, not share its traffic
        ]
        self._server = grpc.aio.server(options=options)
        pb_grpc.add_FederationServicer_to_server(_Servicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls:
                port = self._server.add_secure_port(address, server_credentials(self.config.tls))
            else:
                log.warning("serving WITHOUT TLS on %s (insecure: true); use it on loopback only", address)
                port = self._server.add_insecure_port(address)
        except RuntimeError as e:
            raise RMMError(
                f"cannot listen on {address} ({e}); is another coordinator running there? choose another port",
            ) from None
        await self._server.start()
        for service in ("", SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._ticker = asyncio.create_task(self._tick())
        log.info(
            "coordinator serving %d federations on %s:%d, state in %s",
            len(self.federations),
            self.config.host,
            port,
            self.config.state_dir,
        )
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (in-flight calls get `grace` seconds), then wait for a running aggregation.

        An aggregation cannot be interrupted; waiting for it leaves the state on disk final, and
        a coordinator killed instead simply aggregates again when it restarts.
        """
        await self._health.enter_graceful_shutdown()
        if self._ticker:
            self._ticker.cancel()
        if self._server:
            await self._server.stop(grace)
        await asyncio.gather(*self._aggregating.values(), return_exceptions=True)
        if self._lock:
            self._lock.close()  # releases the flock
            self._lock = None
        log.info("coordinator stopped")

    async def wait_closed(self) -> None:
        """Until the server has stopped (for embedding: `await start()`, then this)."""
        if self._server:
            await self._server.wait_for_termination()

    async def wait_change(self, federation_id: str, timeout: float) -> None:
        """Until the federation's state changes (a round closes, it is DONE or FAILED) or `timeout` passes."""
        try:
            await asyncio.wait_for(self._changed[federation_id].wait(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            pass

    def close_due(self) -> None:
        """Close every round that is due (all sites uploaded, or its deadline passed); aggregate every CLOSING one."""
        for fed in self.federations.values():
            try:
                if fed.advance(time.time()):
                    # The operator's log names the sites; what sites read (Status, refusals) counts them only.
                    log.info(
                        "federation %s %s: %s (committed: %s)",
                        fed.config.id,
                        fed.state,
                        fed.message(),
                        ", ".join(sorted(fed.commits)) or "none",
                    )
                    self._changed_phase(fed)
            except OSError:
                log.exception("federation %s: cannot write its phase; fix the state directory", fed.config.id)
                continue
            if fed.progress.phase is Phase.CLOSING and fed.config.id not in self._aggregating:
                task = asyncio.create_task(self._aggregate(fed))
                self._aggregating[fed.config.id] = task
                task.add_done_callback(lambda _, id=fed.config.id: self._aggregating.pop(id))

    def _changed_phase(self, fed: FederationState) -> None:
        changed, self._changed[fed.config.id] = self._changed[fed.config.id], asyncio.Event()
        changed.set()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.close_due()

    async def _aggregate(self, fed: FederationState) -> None:
        """Aggregate a CLOSING round: DONE, CURVES (method auto's first round), or FAILED with why."""
        try:
            try:
                await asyncio.to_thread(fed.aggregate)
            except Exception as e:  # whatever stops the aggregation is the federation's outcome
                log.exception("federation %s: aggregation failed", fed.config.id)
                await asyncio.to_thread(fed.fail, f"aggregation failed: {e}")
        except OSError:
            log.exception(
                "federation %s: cannot write its result; fix the state directory and restart the coordinator",
                fed.config.id,
            )
            return
        log.info("federation %s %s: %s", fed.config.id, fed.state, fed.message())
        self._changed_phase(fed)


def _call(method):
    """Authenticate, run the handler, log one line per outcome; a Refused becomes the call's status code."""

    @functools.wraps(method)
    async def wrapper(self: "_Servicer", request, context):
        who = _who(request)
        try:
            fed = self.authenticate(request, context)
            response, outcome = await method(self, fed, request, context)
        except Refused as e:
            log.warning("%s %s refused (%s): %s", method.__name__, who, CODES[e.reason].name, e.message)
            await context.abort(CODES[e.reason], e.message)
        except Exception as e:
            log.exception("%s %s failed", method.__name__, who)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"coordinator error ({type(e).__name__}: {e}); see the coordinator's log",
            )
        log.info("%s %s: %s", method.__name__, who, outcome)
        return response

    return wrapper


def _who(request) -> str:
    # ascii() escapes newlines and control characters: ids come from the caller and go into the log.
    return ascii(f"{request.federation_id}/{request.site_id}")[1:-1]


class _Servicer(pb_grpc.FederationServicer):
    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        tls = coordinator.config.tls
        self.mutual_tls = tls is not None and tls.client_ca is not None

    def authenticate(self, request, context) -> FederationState:
        fed = self.coordinator.federations.get(request.federation_id)
        authenticate(
            context,
            fed.config if fed else None,
            request.federation_id,
            request.site_id,
            mutual_tls=self.mutual_tls,
        )
        return fed

    @_call
    async def Join(self, fed: FederationState, request: pb.JoinRequest, context):
        if not request.HasField("manifest"):
            raise Refused(Reason.INVALID, "the join request has no manifest")
        outcome = await asyncio.to_thread(fed.join, request.site_id, request.manifest)
        # Token hashes, quotas and the other sites' ids stay on the coordinator: a site learns only about itself.
        config = fed.config.model_dump(mode="json") | {"sites": [request.site_id]}
        return pb.JoinResponse(federation_config_json=json.dumps(config)), outcome

    @_call
    async def MissingChunks(self, fed: FederationState, request: pb.MissingChunksRequest, context):
        missing = await asyncio.to_thread(fed.missing_chunks, request.site_id, list(request.sha256))
        return pb.MissingChunksResponse(sha256=missing), f"{len(missing)} of {len(request.sha256)} chunks missing"

    @_call
    async def UploadChunk(self, fed: FederationState, request: pb.UploadChunkRequest, context):
        already = await asyncio.to_thread(fed.store_chunk, request.site_id, request.sha256, request.data)
        outcome = f"chunk {request.sha256[:12]} ({len(request.data)} bytes){' again' if already else ''}"
        return pb.UploadChunkResponse(already_stored=already), outcome

    @_call
    async def Commit(self, fed: FederationState, request: pb.CommitRequest, context):
        outcome = await asyncio.to_thread(fed.commit, request.site_id, list(request.parts))
        self.coordinator.close_due()  # the last site's commit starts the aggregation at once
        return pb.CommitResponse(), outcome

    @_call
    async def Status(self, fed: FederationState, request: pb.StatusRequest, context):
        def idle() -> bool:  # nothing is asked of this site: OPEN, CLOSING, or CURVES / CALIBRATE once its upload is in
            phase = fed.progress.phase
            return phase in (Phase.OPEN, Phase.CLOSING) or (
                phase in (Phase.CURVES, Phase.CALIBRATE) and fed.uploaded(request.site_id)
            )

        end = time.monotonic() + min(max(request.timeout_seconds, 0.0), MAX_WAIT)
        while request.wait and idle() and end > time.monotonic():
            await self.coordinator.wait_change(fed.config.id, end - time.monotonic())
        result = fed.result or fed.candidates or fed.bases or {}
        response = pb.StatusResponse(
            state=fed.state,
            # Only the calling site's own membership: no site learns which others joined or committed.
            joined_sites=[request.site_id] if request.site_id in fed.manifests else [],
            committed_sites=[request.site_id] if request.site_id in fed.commits else [],
            min_sites=fed.config.min_sites,
            message=fed.message(),
            basis_sha256=result.get("basis_sha256", ""),
            basis_size=result.get("basis_size", 0),
            uploaded=fed.uploaded(request.site_id),
        )
        return response, fed.state

    @_call
    async def Publish(self, fed: FederationState, request: pb.PublishRequest, context):
        publication = self.coordinator.publications[fed.config.id]
        return pb.PublishResponse(), await asyncio.to_thread(publication.publish, request.site_id, list(request.tasks))

    @_call
    async def Report(self, fed: FederationState, request: pb.ReportRequest, context):
        return pb.ReportResponse(json=json.dumps(fed.report(request.site_id), indent=1)), "sent"

    async def DownloadBasis(self, request: pb.DownloadRequest, context):
        who = _who(request)
        try:
            fed = self.authenticate(request, context)
            file, _, size = fed.download()
            if not 0 <= request.offset <= size:
                raise Refused(
                    Reason.OUT_OF_RANGE,
                    f"offset {request.offset} is outside the basis of {size} bytes; resume from 0 to {size}",
                )
        except Refused as e:
            log.warning("DownloadBasis %s refused (%s): %s", who, CODES[e.reason].name, e.message)
            await context.abort(CODES[e.reason], e.message)
        offset = request.offset
        try:
            while offset < size:
                data, digest = await asyncio.to_thread(_read_chunk, file, offset)
                yield pb.Chunk(offset=offset, data=data, sha256=digest)
                offset += len(data)
                fed.count(request.site_id, sent=len(data))  # in memory; saved once the download ends
            await asyncio.to_thread(fed.save_traffic, request.site_id)
        except OSError as e:
            log.exception("DownloadBasis %s failed at byte %d", who, offset)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"coordinator cannot read the basis ({e}); see the coordinator's log",
            )
        log.info("DownloadBasis %s: sent bytes %d to %d", who, request.offset, size)


def _read_chunk(file, offset: int) -> tuple[bytes, str]:
    with open(file, "rb") as f:
        f.seek(offset)
        data = f.read(MAX_CHUNK)
    return data, hashlib.sha256(data).hexdigest()


def run(config: CoordinatorConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly: in-flight calls get a few seconds."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        coordinator = Coordinator(config)
        await coordinator.start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received; stopping")
        await coordinator.stop(grace=5.0)

    asyncio.run(serve())
