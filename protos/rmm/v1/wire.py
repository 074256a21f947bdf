"""What both ends of rmm.v1 agree on beyond its messages: the size limits, and how a site repeats a call.

The coordinator (coordinator/) and the sites (workers/) both import this module, so a site needs
nothing of the coordinator. Hand-written: `make protos` regenerates only the *_pb2* files beside it.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import grpc

from rmm.errors import RMMError

MAX_CHUNK = 4 * 1024 * 1024  # bytes of one upload or download chunk
MAX_MESSAGE = MAX_CHUNK + 64 * 1024  # gRPC message limit on both sides: a chunk plus its envelope
MESSAGE_LIMITS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retry:
    """How a site repeats a call the coordinator could not take: exponential backoff with jitter,
    for at most `seconds` from the first failure (a restarting coordinator takes a few)."""

    seconds: float = 120.0
    first: float = 0.5  # the first wait; each next one doubles, up to `longest`
    longest: float = 10.0

    def run(self, what: str, attempt):
        """attempt() until it succeeds, or fails otherwise than transiently, or the time is up."""
        give_up, delay = None, self.first
        while True:
            try:
                return attempt()
            except grpc.RpcError as e:
                now = time.monotonic()
                give_up = give_up or now + self.seconds
                if _handshake_failed(e):
                    raise RMMError(
                        f"{what} failed ({e.code().name}): TLS handshake with the coordinator failed ({e.details()}); "
                        "check that --ca is the CA that signed the coordinator's certificate "
                        "and the address is a name it holds"
                    ) from None
                if not transient(e) or now >= give_up:
                    retried = f" (retried for {self.seconds:.0f} s)" if transient(e) else ""
                    raise RMMError(f"{what} failed ({e.code().name}): {e.details()}{retried}") from None
                pause = min(delay, give_up - now) * random.uniform(0.5, 1.0)
                log.warning("%s: coordinator unavailable (%s); retrying in %.1f s", what, e.details(), pause)
                time.sleep(pause)
                delay = min(2 * delay, self.longest)


def _handshake_failed(e: grpc.RpcError) -> bool:
    """The site rejected the coordinator's certificate: a configuration error that no retry mends. (A coordinator
    rejecting the site's certificate only closes the socket, which looks like a restart: that one is retried.)"""
    return e.code() == grpc.StatusCode.UNAVAILABLE and "handshake failed" in (e.details() or "").lower()


def transient(e: grpc.RpcError) -> bool:
    """Whether the call failed because the coordinator went away (restart, dropped connection), not because
    it refused."""
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    # A connection reset mid-call can surface as UNKNOWN or INTERNAL; the coordinator's own errors never say this.
    return e.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and any(
        words in (e.details() or "") for words in ("Stream removed", "Connection reset", "RST_STREAM", "Socket closed")
    )
