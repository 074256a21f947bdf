"""The coordinator's durable state of one federation, under `state_dir/<federation id>/`:

    phase.json                             where the federation is (`Progress`): its phase, round, deadline, sites
    config.json                            the federation config as first served
    sites/<site>/manifest.json             the joined SiteManifest (protobuf JSON)
    sites/<site>/chunks/<sha256>           uploaded chunks, content-addressed, kept across restarts; dropped
                                           when the site commits (its round's uploads end) or publishes them
    sites/<site>/parts/<name>.safetensors  the assembled parts, in place only at a successful commit
    sites/<site>/commit.json               the commit (parts, tasks, time); written last, so it marks it
    sites/<site>/traffic.json              bytes received from and sent to the site, saved at each stage's end
    sites/<site>/curves/parts/, commit.json  method "auto" only: the site's second upload (curves)
    sites/<site>/calibration/parts/, commit.json  with calibrate: the site's third (divergence sums per candidate)
    bases/bases.safetensors, bases.json    method "auto" only: the joint bases of round 1
    candidates/candidates.safetensors, candidates.json  with calibrate: every candidate plan's basis, after round 2
    result/basis.safetensors, result.json  DONE: the basis (for "auto": the plan) and what it was made of
    result/...                             published tasks (see coordinator/publish.py)

The phases: OPEN (round 1: collecting uploads) -> CLOSING (aggregating the round's sites) -> DONE, or,
method auto, OPEN -> CLOSING -> CURVES (round 2: the bases are out, collecting curves) -> CLOSING -> DONE,
and with calibrate, before DONE: CALIBRATE (round 3: every candidate plan's basis is out, collecting each site's
divergence per candidate summed over its tasks) -> CLOSING (the least total wins) -> DONE; a round whose deadline
passes without enough uploads goes to FAILED. Each transition rewrites phase.json whole, and a restart resumes from
it: a CLOSING federation aggregates again.

Every file is written under a temporary name and renamed into place (fsynced first), so a
coordinator killed at any moment restarts from whole files: an acknowledged chunk is on disk, a
commit is complete or absent, a result is complete or absent. Leftover temporaries are removed
on start.

Methods that write run in worker threads (`asyncio.to_thread`); `lock` orders the few steps that
must not interleave: a commit landing, a join, a publication, and a phase transition.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Literal

import torch
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, ValidationError

from coordinator.config import FederationConfig
from protos.rmm.v1 import federation_pb2 as pb
from protos.rmm.v1.wire import MAX_CHUNK
from rmm.bundle import BASIS_FILE, ModuleEntry
from rmm.calibrate import chosen
from rmm.errors import RMMError
from rmm.io import atomic_dir, open_safetensors, read_tensor, safe_name, sha256_file
from rmm.payload import (
    aggregate,
    check_divergences,
    check_round_payload,
    read_divergences,
    read_payload,
    split_candidates,
    write_bases,
    write_candidates,
    write_plan,
)
from rmm.plan import plan_modules
from rmm.storage import FACTORS

SHA256 = re.compile(r"^[0-9a-f]{64}$")
ROUND_DIRS = {1: "", 2: "curves", 3: "calibration"}  # where a site's upload of each round lands, under its directory
ROUND_KINDS = {2: "curves", 3: "divergences"}  # the payload kind of rounds 2 and 3 (round 1: the manifest's)


class Reason(Enum):
    """Why a call was refused, whatever the transport: coordinator/server.py maps each to a gRPC status code."""

    INVALID = "invalid"  # the request, or the data it points at, is malformed
    PRECONDITION = "precondition"  # a valid request the federation takes not now or not from this site
    DENIED = "denied"  # the caller is who it says, but may not do this
    UNAUTHENTICATED = "unauthenticated"  # no credentials, or not a site's
    NOT_FOUND = "not found"  # no such federation
    EXHAUSTED = "exhausted"  # a per-site quota
    CONFLICT = "conflict"  # the state changed during the call: call again
    OUT_OF_RANGE = "out of range"  # a download offset past the file


class Refused(Exception):
    """A call refused, with a reason and a message that says what to do. Nothing changed."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class Phase(str, Enum):
    OPEN = "OPEN"  # round 1: collecting the sites' uploads, until all committed or the deadline
    CURVES = "CURVES"  # method auto, round 2: the bases are out; collecting the curves of the bases' sites
    CALIBRATE = "CALIBRATE"  # with calibrate, round 3: the candidates are out; collecting those sites' divergences
    CLOSING = "CLOSING"  # a round closed with `sites`: aggregating them (again, after a restart)
    DONE = "DONE"  # the basis (auto: the plan) is in result/: sites download it, and may publish
    FAILED = "FAILED"  # final: `message` says why


class Progress(BaseModel):
    """phase.json: rewritten whole at each transition, read on start."""

    model_config = ConfigDict(extra="forbid")

    phase: Phase
    round: Literal[1, 2, 3] = 1  # 1: the sites' first uploads; 2: method auto's curves; 3: its divergences
    created: float  # the federation's first start; never rewritten, so deadlines survive restarts
    deadline: float  # the current round's: created + deadline_seconds; later rounds: their start + deadline_seconds
    sites: list[str] = []  # CURVES, CALIBRATE: the bases' sites; CLOSING, DONE: the sites aggregated; FAILED: committed
    message: str = ""  # CLOSING, DONE, FAILED: what it is doing, or did
    finished: float | None = None  # DONE, FAILED


def write_atomic(path: Path, data: bytes) -> None:
    # A unique temporary name: two retries of one chunk may be written at the same time.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename itself must reach the disk too before the write is acknowledged.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class FederationState:
    def __init__(self, state_dir: Path, config: FederationConfig):
        self.config = config
        self.dir = Path(state_dir) / config.id
        self.lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()
        self.progress = self._load_progress()
        self._check_config()
        self.manifests: dict[str, pb.SiteManifest] = {}
        self.commits: dict[str, dict] = {}
        self.curves: dict[str, dict] = {}  # method "auto": the second round's commits
        self.divergences: dict[str, dict] = {}  # with calibrate: the third round's
        self.traffic: dict[str, dict[str, int]] = {}
        # Per site, the uploaded chunks no commit consumed yet (sha256 -> bytes) and their total (max_pending_bytes).
        self.pending: dict[str, dict[str, int]] = {}
        self.pending_bytes: dict[str, int] = {}
        for site_dir in sorted((self.dir / "sites").glob("*")):
            self._load_site(site_dir.name, site_dir)
        # The bases exist from round 2 on, the candidates in round 3; a result only once DONE (a CLOSING federation
        # rewrites any of them).
        bases, result = self.dir / "bases" / "bases.json", self.dir / "result" / "result.json"
        candidates = self.dir / "candidates" / "candidates.json"
        self.bases: dict | None = json.loads(bases.read_text()) if self.progress.round >= 2 else None
        self.candidates: dict | None = json.loads(candidates.read_text()) if self.progress.round == 3 else None
        self.result: dict | None = json.loads(result.read_text()) if self.progress.phase is Phase.DONE else None

    def _remove_temporaries(self) -> None:
        # Temporary files, commit staging and atomic_dir's result directory of a killed coordinator.
        for p in sorted(self.dir.rglob(".*"), reverse=True):  # children before their directories
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def _load_progress(self) -> Progress:
        file = self.dir / "phase.json"
        if file.exists():
            try:
                return Progress.model_validate_json(file.read_bytes())
            except ValidationError as e:
                raise RMMError(f"not a phase file of this coordinator ({e.errors()[0]['msg']})", file=file) from None
        if (self.dir / "config.json").exists():  # an older coordinator inferred the phase from which files existed
            raise RMMError(
                f"federation {self.config.id!r} was started by an older coordinator (no phase.json); finish it with "
                "that version, or move this directory away to start the federation again",
                file=self.dir,
            )
        now = time.time()
        return self._save(Progress(phase=Phase.OPEN, created=now, deadline=now + self.config.deadline_seconds))

    def _save(self, progress: Progress) -> Progress:
        write_atomic(self.dir / "phase.json", progress.model_dump_json(indent=1).encode())
        return progress

    def _move(self, **changes) -> None:
        """The next phase: on disk first, so a crash leaves the old phase or the new one whole."""
        self.progress = self._save(Progress(**(self.progress.model_dump() | changes)))

    def _check_config(self) -> None:
        file = self.dir / "config.json"
        now = self.config.model_dump(mode="json")
        if not file.exists():
            _write_json(file, now)
            return
        before = json.loads(file.read_text())
        if before != now:
            field = next(k for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k))
            then, now = (repr(x.get(field))[:80] for x in (before, now))  # a module list can be long
            raise RMMError(
                f"federation {self.config.id!r} was started with another config ({field}: {then} then, {now} now); "
                "restore that config, or give the changed federation a new id",
                file=file,
            )

    def _load_site(self, site: str, site_dir: Path) -> None:
        if (site_dir / "manifest.json").exists():
            self.manifests[site] = json_format.Parse((site_dir / "manifest.json").read_text(), pb.SiteManifest())
        consumed = set()
        for round in (1, 2, 3):
            store, where = self._store(round), site_dir / ROUND_DIRS[round]
            if (where / "commit.json").exists():
                store[site] = json.loads((where / "commit.json").read_text())
                consumed.update(_chunks_of(store[site]["parts"]))
            else:
                shutil.rmtree(where / "parts", ignore_errors=True)  # a crash between the parts and commit.json
        # Chunks a landed commit consumed are gone (a crash between the commit and its cleanup); the others,
        # e.g. the curves a site is uploading, are acknowledged and stay.
        self._drop_chunks(site, consumed)
        for chunk in sorted((site_dir / "chunks").glob("*")):
            self._hold(site, chunk.name, chunk.stat().st_size)
        if (site_dir / "traffic.json").exists():
            self.traffic[site] = json.loads((site_dir / "traffic.json").read_text())

    # -- the phase --------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The phase's name, as Status and Report send it."""
        return self.progress.phase.value

    @property
    def deadline(self) -> float:
        return self.progress.deadline

    def missing_sites(self) -> list[str]:
        return [s for s in self.config.sites if s not in self.commits]

    def _store(self, round: int) -> dict[str, dict]:
        """The commits of a round, by site: first uploads, curves or divergences."""
        return (self.commits, self.curves, self.divergences)[round - 1]

    def uploaded(self, site: str) -> bool:
        """Whether the site's upload of the current round is committed."""
        return site in self._store(self.progress.round)

    def missing_uploads(self) -> list[str]:
        """Rounds 2 and 3: the bases' sites whose upload of the round is not in."""
        return [s for s in self.progress.sites if not self.uploaded(s)]

    def message(self) -> str:
        """What the federation is doing, for any site: counts only, never another site's name."""
        left = max(0.0, self.deadline - time.time())
        match self.progress.phase:
            case Phase.OPEN:
                return (
                    f"waiting: {len(self.commits)} of {len(self.config.sites)} sites committed, "
                    f"min_sites={self.config.min_sites}, deadline in {left:.0f} s"
                )
            case Phase.CURVES | Phase.CALIBRATE:
                ready, what = (
                    ("bases", "curves") if self.progress.phase is Phase.CURVES else ("candidates", "divergences")
                )
                sites, missing = len(self.progress.sites), len(self.missing_uploads())
                return f"{ready} ready; waiting for the {what} of {missing} of {sites} sites, deadline in {left:.0f} s"
            case _:
                return self.progress.message

    def advance(self, now: float) -> bool:
        """Close the current round if it is due (every site uploaded, or its deadline passed): CLOSING, or
        FAILED without the uploads it needs. True when the phase changed.

        Closing is final: later commits are refused, so the basis covers exactly the sites CLOSING names.
        """
        with self.lock:
            match self.progress.phase:
                case Phase.OPEN if self.missing_sites() and now < self.deadline:
                    return False
                case Phase.OPEN if len(self.commits) >= self.config.min_sites:
                    self._move(
                        phase=Phase.CLOSING,
                        sites=sorted(self.commits),
                        message=f"aggregating {len(self.commits)} sites",
                    )
                case Phase.OPEN:
                    self._fail(
                        f"deadline passed: {len(self.commits)} of min_sites={self.config.min_sites} sites committed",
                    )
                case Phase.CURVES if not self.missing_uploads():
                    self._move(
                        phase=Phase.CLOSING,
                        message=f"allocating the storage budget over {len(self.bases['tasks'])} tasks",
                    )
                case Phase.CALIBRATE if not self.missing_uploads():
                    self._move(phase=Phase.CLOSING, message=f"choosing among {len(self.candidates['plans'])} plans")
                case Phase.CURVES | Phase.CALIBRATE if now >= self.deadline:
                    missing, sites = len(self.missing_uploads()), len(self.progress.sites)
                    what = "curves" if self.progress.phase is Phase.CURVES else "divergences"
                    self._fail(f"deadline passed without the {what} of {missing} of {sites} sites")
                case _:
                    return False
            return True

    def fail(self, message: str) -> None:
        with self.lock:
            self._fail(message)

    def _fail(self, message: str) -> None:
        self._move(phase=Phase.FAILED, sites=sorted(self.commits), message=message, finished=time.time())

    def _upload_round(self, site: str) -> int:
        """The round whose upload the site may send now (1, method auto's curves 2, its divergences 3); refused when
        none."""
        match self.progress.phase:
            case Phase.OPEN if site not in self.commits:
                return 1
            case Phase.CURVES | Phase.CALIBRATE if site in self.progress.sites and not self.uploaded(site):
                return self.progress.round
            case Phase.CURVES | Phase.CALIBRATE if site not in self.progress.sites:
                raise Refused(
                    Reason.PRECONDITION,
                    f"site {site} is not in this federation's bases (it committed too late); nothing more to upload",
                )
            case Phase.OPEN | Phase.CURVES | Phase.CALIBRATE:
                raise Refused(Reason.PRECONDITION, f"site {site} already committed; nothing more to upload")
            case _:
                raise Refused(
                    Reason.PRECONDITION,
                    f"federation {self.config.id} closed ({self.message()}); it takes no more uploads",
                )

    # -- calls ------------------------------------------------------------------------------------

    def join(self, site: str, manifest: pb.SiteManifest) -> str:
        _check_tasks(self.config, manifest)
        with self.lock:
            before = self.manifests.get(site)
            if before == manifest:
                return "joined again (same manifest)"
            if self.progress.phase is not Phase.OPEN:
                raise Refused(
                    Reason.PRECONDITION,
                    f"federation {self.config.id} is closed ({self.message()}); it takes no more joins",
                )
            if site in self.commits:
                raise Refused(
                    Reason.PRECONDITION,
                    f"site {site} already committed with another manifest; a commit is final",
                )
            _check_manifest(self.config, manifest, {t for s, m in self.manifests.items() if s != site for t in m.tasks})
            site_dir = self.dir / "sites" / site
            site_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(site_dir / "manifest.json", json_format.MessageToJson(manifest).encode())
            self.manifests[site] = manifest
            return "joined" if before is None else "joined with a new manifest"

    def missing_chunks(self, site: str, digests: list[str]) -> list[str]:
        self.joined(site)
        bad = [d for d in digests if not SHA256.match(d)]
        if bad:
            raise Refused(Reason.INVALID, f"{bad[0]!r} is not a sha256 (64 lowercase hex digits)")
        # The current round's commit consumed its chunks: their bytes are in the committed parts.
        current = self._store(self.progress.round).get(site)
        held = _chunks_of(current["parts"]) if current else set()
        chunks = self.dir / "sites" / site / "chunks"
        return [d for d in digests if d not in held and not (chunks / d).is_file()]

    def store_chunk(self, site: str, digest: str, data: bytes) -> bool:
        """Store one chunk; True when it was already stored."""
        self.joined(site)
        if not (self.progress.phase is Phase.DONE and site in self.progress.sites):  # after DONE, only to publish
            self._upload_round(site)
        if len(data) > MAX_CHUNK:
            raise Refused(
                Reason.INVALID,
                f"chunk of {len(data)} bytes exceeds the {MAX_CHUNK}-byte limit; split parts into smaller chunks",
            )
        if not SHA256.match(digest):
            raise Refused(Reason.INVALID, f"{digest!r} is not a sha256 (64 lowercase hex digits)")
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise Refused(
                Reason.INVALID,
                f"chunk sha256 is {actual}, not {digest} as sent; the chunk was damaged, send it again",
            )
        chunks = self.dir / "sites" / site / "chunks"
        with self.lock:
            used = self.pending_bytes.get(site, 0)
            if digest not in self.pending.get(site, {}) and used + len(data) > self.config.max_pending_bytes:
                raise Refused(
                    Reason.EXHAUSTED,
                    f"site {site} already holds {used} bytes of uploaded chunks that no commit has consumed, and "
                    f"the federation's max_pending_bytes is {self.config.max_pending_bytes}; commit what is uploaded, "
                    "or ask the operator to raise it",
                )
        chunks.mkdir(exist_ok=True)
        already = (chunks / digest).is_file()
        if not already:
            write_atomic(chunks / digest, data)
        with self.lock:
            self._hold(site, digest, len(data))
        self.count(site, received=len(data))
        return already

    def _hold(self, site: str, digest: str, size: int) -> None:
        held = self.pending.setdefault(site, {})
        if digest not in held:
            held[digest] = size
            self.pending_bytes[site] = self.pending_bytes.get(site, 0) + size

    def _drop_chunks(self, site: str, digests: set[str]) -> None:
        """Remove chunks a commit or a publication ended (the bytes they carried are in its files now)."""
        held = self.pending.get(site, {})
        for digest in digests:
            (self.dir / "sites" / site / "chunks" / digest).unlink(missing_ok=True)
            self.pending_bytes[site] = self.pending_bytes.get(site, 0) - held.pop(digest, 0)

    def commit(self, site: str, parts: list[pb.Part]) -> str:
        """The site's upload of the current round: its payload parts (round 1) or, method auto, its curves (round 2)."""
        manifest = self.joined(site)
        record = [{"name": p.name, "chunks": list(p.chunks), "sha256": p.sha256, "size": p.size} for p in parts]
        if any(c["parts"] == record for c in (self._store(r).get(site) for r in (1, 2, 3)) if c):
            return "committed again (same parts)"  # a retry, or an earlier round's upload sent again
        return self._land(site, record, manifest, self._upload_round(site))

    def _land(self, site: str, record: list[dict], manifest: pb.SiteManifest, round: int) -> str:
        """Assemble and check the parts from the site's chunks, then make the commit durable."""
        store, where = self._store(round), self.dir / "sites" / site / ROUND_DIRS[round]
        kind = ROUND_KINDS.get(round, manifest.upload_kind)
        check_parts(record)
        chunks = self.dir / "sites" / site / "chunks"
        wanted = {c for part in record for c in part["chunks"]}
        missing = [c for c in wanted if not (chunks / c).is_file()]
        if missing:
            raise Refused(
                Reason.PRECONDITION,
                f"{len(missing)} of {len(wanted)} chunks are not stored; upload them (MissingChunks lists them) and "
                "commit again",
            )
        where.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".commit-", dir=where))
        try:
            tasks = numbers = 0
            for part in record:
                file = staging / f"{part['name']}.safetensors"
                assemble(chunks, part, file)
                tasks += self._check_payload(file, part["name"], manifest, kind)
                numbers += _spectra_numbers(file, self.config.modules) if kind == "spectra" else 0
            if tasks != len(manifest.tasks):
                raise Refused(
                    Reason.INVALID,
                    f"the parts hold {tasks} tasks, the manifest lists {len(manifest.tasks)}; upload every task's "
                    "share once",
                )
            # Method auto's budget is a share of the sites' LoRA numbers: the ranks uploaded must give what was declared
            if kind == "spectra" and numbers != manifest.lora_numbers:
                raise Refused(
                    Reason.INVALID,
                    f"the manifest's lora_numbers {manifest.lora_numbers} differ from the {numbers} the spectra's "
                    f"ranks give; join again with {numbers}",
                )
            with self.lock:
                if store.get(site, {}).get("parts") == record:  # a concurrent retry of this commit landed first
                    return "committed again (same parts)"
                if self.manifests[site] is not manifest:
                    raise Refused(
                        Reason.CONFLICT,
                        "the site joined again with another manifest during this commit; commit again",
                    )
                self._upload_round(site)  # still open to this site: the round may have closed meanwhile
                shutil.rmtree(where / "parts", ignore_errors=True)
                staging.rename(where / "parts")
                store[site] = {"parts": record, "tasks": tasks, "committed": time.time()}
                _write_json(where / "commit.json", store[site])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self.lock:  # the commit ends the site's uploads for this round: what its parts did not use is stale
            self._drop_chunks(site, set(self.pending.get(site, {})))
            self._save_traffic(site)
        return f"committed {len(record)} {kind} parts, {tasks} tasks"

    def consume(self, site: str, digests: set[str]) -> None:
        """A publication ended these chunks; the site's traffic so far is saved."""
        with self.lock:
            self._drop_chunks(site, digests)
            self._save_traffic(site)

    def count(self, site: str, *, received: int = 0, sent: int = 0) -> None:
        """Count traffic in memory; `save_traffic` persists it at the end of a stage (commit, download, publication)."""
        with self.lock:
            t = self.traffic.setdefault(site, {"bytes_received": 0, "bytes_sent": 0})
            t["bytes_received"] += received
            t["bytes_sent"] += sent

    def save_traffic(self, site: str) -> None:
        with self.lock:
            self._save_traffic(site)

    def _save_traffic(self, site: str) -> None:
        if site in self.traffic:
            (self.dir / "sites" / site).mkdir(parents=True, exist_ok=True)
            _write_json(self.dir / "sites" / site / "traffic.json", self.traffic[site])

    def download(self) -> tuple[Path, str, int]:
        """What DownloadBasis serves now, its sha256 and size: the bases (CURVES), the candidates (CALIBRATE) or the
        basis (DONE)."""
        match self.progress.phase:
            case Phase.CURVES:
                return self.dir / "bases" / "bases.safetensors", self.bases["basis_sha256"], self.bases["basis_size"]
            case Phase.CALIBRATE:
                c = self.candidates
                return self.dir / "candidates" / "candidates.safetensors", c["basis_sha256"], c["basis_size"]
            case Phase.DONE:
                return self.dir / "result" / BASIS_FILE, self.result["basis_sha256"], self.result["basis_size"]
            case _:
                raise Refused(
                    Reason.PRECONDITION,
                    f"federation {self.config.id} is {self.state}, not DONE: {self.message()}; wait with Status",
                )

    def joined(self, site: str) -> pb.SiteManifest:
        if site not in self.manifests:
            raise Refused(
                Reason.PRECONDITION,
                f"site {site} has not joined federation {self.config.id}; call Join first",
            )
        return self.manifests[site]

    def _check_payload(self, file: Path, name: str, manifest: pb.SiteManifest, kind: str) -> int:
        """The part's task count, once it reads as a payload of `kind` that fits every module."""

        def bad(reason: str) -> Refused:
            return Refused(Reason.INVALID, f"part {name}: {reason}")

        try:
            with open_safetensors(file) as f:
                meta = f.metadata() or {}
            if meta.get("kind") != kind:
                raise bad(f"payload kind {meta.get('kind')!r}, but this upload takes {kind!r}")
            if kind in ("spectra", "curves"):
                bases = self.dir / "bases" / "bases.safetensors" if kind == "curves" else None
                return len(check_round_payload(file, kind, self.config.modules, list(manifest.tasks), bases))
            if kind == "divergences":
                return len(check_divergences(file, self.candidates["plans"], list(manifest.tasks)))
            n = int(meta.get("n", "0"))
            for module, moments in zip(self.config.modules, read_payload(file, self.config.modules)):
                for factor, positions in zip(FACTORS, (module.out_features, module.in_features)):
                    m, r = moments[factor], module.rank
                    if m.n != n or m.s1.shape != (positions, r) or m.s2.shape != (positions, r, r):
                        raise bad(
                            f"module {module.name} factor {factor} does not fit {positions} positions of "
                            f"rank {r} for {n} tasks"
                        )
                    if not (torch.isfinite(m.s1).all() and torch.isfinite(m.s2).all()):
                        raise bad(f"module {module.name} factor {factor} holds NaN or infinite values")
        except RMMError as e:
            raise bad(
                f"not a valid {kind} payload: {e.reason}" + (f" (module {e.module})" if e.module else ""),
            ) from None
        except ValueError as e:
            raise bad(f"not a valid {kind} payload: {e}") from None
        return n

    # -- closing ----------------------------------------------------------------------------------

    def aggregate(self) -> None:
        """Aggregate the sites of the CLOSING round.

        rmm-paper: plan the basis sizes for the committed tasks, sum every part's moments and solve; DONE.
        auto, round 1: the joint bases from the sites' spectra; CURVES. auto, round 2: allocate the
        budget from the spectra and curves; DONE with the plan as the basis file, or, with calibrate, every
        candidate plan's basis; CALIBRATE. Round 3: the candidate of the least summed divergence; DONE.
        """
        started = time.time()
        clock = time.perf_counter()
        sites = self.progress.sites
        manifests = [self.manifests[s] for s in sites]
        tasks = [t for m in manifests for t in m.tasks]
        parts = self._parts(sites, self.commits, "")
        if self.config.merge.method == "auto" and self.progress.round == 1:
            return self._write_bases(tasks, parts, started, clock)
        lora_numbers = sum(m.lora_numbers for m in manifests)
        dtype = getattr(torch, self.config.basis_dtype)
        if self.progress.round == 2:  # what write_plan and write_candidates allocate from
            curves = self._parts(sites, self.curves, ROUND_DIRS[2])
            budget = self.config.merge.storage_ratio * lora_numbers
            auto = (parts, curves, self.config.modules, budget, self.dir / "bases" / "bases.safetensors")
            if self.config.calibrate:
                return self._write_candidates(auto, dtype, clock)
        calibration = None
        with atomic_dir(self.dir / "result") as tmp:
            if self.progress.round == 3:
                modules, energy, calibration = self._choose(sites, lora_numbers, tmp / BASIS_FILE)
            elif self.progress.round == 2:
                modules, energy = write_plan(*auto, tmp / BASIS_FILE, dtype)
            else:
                modules = plan_modules(self.config.modules, len(tasks), lora_numbers, self.config.merge)
                energy = aggregate(parts, modules, tmp / BASIS_FILE, dtype)
            solved = time.perf_counter()
            result = {
                "sites": sites,
                "tasks": tasks,
                "modules": [m.model_dump() for m in modules],
                "energy": energy,
                "basis_sha256": sha256_file(tmp / BASIS_FILE),
                "basis_size": (tmp / BASIS_FILE).stat().st_size,
                "seconds": (self.candidates or self.bases or {}).get("seconds", {})
                | {
                    "collect": started - self.progress.created,
                    "aggregate": solved - clock,
                    "hash": time.perf_counter() - solved,
                },
            }
            if calibration:
                result["calibration"] = calibration
            _write_json(tmp / "result.json", result)
        with self.lock:
            self.result = result
            self._move(
                phase=Phase.DONE,
                message=f"aggregated {len(tasks)} tasks of {len(sites)} sites",
                finished=time.time(),
            )

    def _write_candidates(self, auto: tuple, dtype: torch.dtype, clock: float) -> None:
        """With calibrate, end of round 2: every candidate plan's basis (`auto`: what `write_candidates` allocates
        from), for the sites to measure; CALIBRATE."""
        with atomic_dir(self.dir / "candidates") as tmp:
            plans = write_candidates(*auto, tmp / "candidates.safetensors", dtype)
            candidates = {
                "plans": list(plans),
                "candidates": plans,
                "basis_sha256": sha256_file(tmp / "candidates.safetensors"),
                "basis_size": (tmp / "candidates.safetensors").stat().st_size,
                "seconds": self.bases["seconds"] | {"candidates": time.perf_counter() - clock},
            }
            _write_json(tmp / "candidates.json", candidates)
        with self.lock:  # round 3 has a deadline of its own, from now
            self.candidates = candidates
            self._move(phase=Phase.CALIBRATE, round=3, deadline=time.time() + self.config.deadline_seconds, message="")

    def _choose(self, sites: list[str], lora_numbers: int, file: Path) -> tuple[list[ModuleEntry], dict, dict]:
        """End of round 3: the candidate with the least divergence summed over the sites (in `sites` order) and their
        tasks; its basis (split from the candidates file the sites measured) into `file`. Its modules, energy kept,
        and the calibration's record (each candidate's total and storage, the one chosen)."""
        names = self.candidates["plans"]
        totals = dict.fromkeys(names, 0.0)
        for part in self._parts(sites, self.divergences, ROUND_DIRS[3]):
            sums = read_divergences(part)
            totals = {name: totals[name] + sums[name] for name in names}
        best = chosen(totals)
        split = split_candidates(self.dir / "candidates" / "candidates.safetensors", file.parent / ".split", [best])
        split[best].replace(file)
        split[best].parent.rmdir()
        plan = self.candidates["candidates"][best]
        record = {
            "chosen": best,
            "totals": totals,
            "storage_ratio": {name: c["numbers"] / lora_numbers for name, c in self.candidates["candidates"].items()},
            "dw_objective": {name: c["dw_objective"] for name, c in self.candidates["candidates"].items()},
        }
        return [ModuleEntry.model_validate(m) for m in plan["modules"]], plan["energy"], record

    def _parts(self, sites: list[str], store: dict[str, dict], round_dir: str) -> list[Path]:
        """The committed part files of `sites`: first uploads (store commits, round_dir "") or curves."""
        site = self.dir / "sites"
        return [site / s / round_dir / "parts" / f"{p['name']}.safetensors" for s in sites for p in store[s]["parts"]]

    def _write_bases(self, tasks: list[str], parts: list[Path], started: float, clock: float) -> None:
        """Method auto, end of round 1: the joint bases every site needs for its curves; CURVES."""
        with atomic_dir(self.dir / "bases") as tmp:
            write_bases(parts, self.config.modules, tmp / "bases.safetensors")
            bases = {
                "tasks": tasks,
                "basis_sha256": sha256_file(tmp / "bases.safetensors"),
                "basis_size": (tmp / "bases.safetensors").stat().st_size,
                "seconds": {"collect": started - self.progress.created, "bases": time.perf_counter() - clock},
            }
            _write_json(tmp / "bases.json", bases)
        with self.lock:  # round 2 has a deadline of its own, from now
            self.bases = bases
            self._move(phase=Phase.CURVES, round=2, deadline=time.time() + self.config.deadline_seconds, message="")

    def report(self, site: str) -> dict:
        """The federation's state and the calling site's own row: nothing of another site's tasks or traffic."""
        r, p = self.result or {}, self.progress
        manifest, commit, traffic = self.manifests.get(site), self.commits.get(site), self.traffic.get(site, {})
        sites = {
            site: {
                "joined": manifest is not None,
                "tasks": len(manifest.tasks) if manifest else 0,
                "upload_kind": manifest.upload_kind if manifest else None,
                "committed": iso(commit["committed"]) if commit else None,
                "bytes_received": traffic.get("bytes_received", 0),
                "bytes_sent": traffic.get("bytes_sent", 0),
            }
        }
        return {
            "federation": self.config.id,
            "state": self.state,
            "message": self.message(),
            "created": iso(p.created),
            "deadline": iso(self.deadline),
            "finished": iso(p.finished),
            "min_sites": self.config.min_sites,
            "sites": sites,
            "aggregated_sites": len(p.sites) if p.phase is Phase.DONE else 0,  # a count: never the other sites' ids
            "modules": r.get("modules", []),
            "energy": r.get("energy", {}),
            "basis_sha256": r.get("basis_sha256"),
            "basis_size": r.get("basis_size"),
            "seconds": r.get("seconds", {}),
            # The plan calibration chose and the candidates' names; never their totals, which with one's own sums
            # would give the other sites' (with two sites, exactly).
            **(
                {"calibration": {"chosen": r["calibration"]["chosen"], "candidates": list(r["calibration"]["totals"])}}
                if "calibration" in r
                else {}
            ),
        }


def _check_tasks(config: FederationConfig, m: pb.SiteManifest) -> None:
    """Task names become file names (coefficients/<task>.safetensors): each must be one; at most max_tasks."""
    if len(m.tasks) > config.max_tasks:
        raise Refused(
            Reason.EXHAUSTED,
            f"the manifest lists {len(m.tasks)} tasks; the federation's max_tasks is {config.max_tasks}",
        )
    for task in m.tasks:
        try:
            safe_name(task)
        except RMMError as e:
            raise Refused(Reason.INVALID, str(e)) from None


def _check_manifest(config: FederationConfig, m: pb.SiteManifest, taken: set[str]) -> None:
    """Refuse a manifest that does not fit the federation; `taken`: the other sites' tasks."""

    def refuse(reason: str):
        raise Refused(Reason.PRECONDITION, f"manifest does not match federation {config.id}: {reason}")

    if m.base_model != config.base_model:
        refuse(f"base_model {m.base_model!r} differs from the federation's {config.base_model!r}")
    names = [x.name for x in m.modules]
    wanted = {x.name: x for x in config.modules}
    for name in names:
        if names.count(name) > 1:
            refuse(f"module {name} is listed twice")
        if name not in wanted:
            refuse(f"module {name} is not one of the federation's {len(wanted)} modules")
    for name in wanted:
        if name not in names:
            refuse(f"module {name} is missing (the federation adapts {len(wanted)} modules; target the same ones)")
    for x in m.modules:
        want = wanted[x.name]
        if (x.out_features, x.in_features) != (want.out_features, want.in_features):
            refuse(
                f"module {x.name} has shape {x.out_features}x{x.in_features}, the federation's is "
                f"{want.out_features}x{want.in_features}",
            )
        if not 1 <= x.rank <= want.rank:
            refuse(f"module {x.name} has rank {x.rank}, the federation allows 1 to {want.rank}")
    if m.upload_kind not in config.upload_kinds and config.merge.method == "auto":
        refuse(
            "the federation uses method auto, whose sites upload 'spectra' (rmm site run --method auto), not "
            f"{m.upload_kind!r}",
        )
    if m.upload_kind not in config.upload_kinds:
        refuse(f"upload_kind {m.upload_kind!r} is not allowed; the federation allows {', '.join(config.upload_kinds)}")
    if m.upload_kind == "sketch" and m.sketch_rank < 1:
        refuse(f"upload_kind 'sketch' needs sketch_rank >= 1, got {m.sketch_rank}")
    if m.canonicalize != config.merge.canonicalize:
        refuse(
            f"canonicalize is {m.canonicalize}, the federation's is {config.merge.canonicalize}; prepare the factors "
            "the same way",
        )
    if config.calibrate and not m.calibration:
        refuse(
            "the federation chooses its plan by calibration: run the site with --base BASE_DIR --calibration DIR "
            "(its tasks' examples)"
        )
    if m.calibration and not config.calibrate:
        refuse("the federation does not calibrate; run the site without --calibration")
    if not m.tasks:
        refuse("it lists no tasks")
    # The budget is a share of the sites' LoRA numbers: each task holds every module at a rank from 1 to the site's.
    least = len(m.tasks) * sum(x.out_features + x.in_features for x in m.modules)
    most = len(m.tasks) * sum(x.rank * (x.out_features + x.in_features) for x in m.modules)
    if not least <= m.lora_numbers <= most:
        raise Refused(
            Reason.INVALID,
            f"lora_numbers {m.lora_numbers} is impossible for {len(m.tasks)} tasks on these modules and ranks "
            f"({least} to {most}); give the LoRA numbers of the site's adapters",
        )
    seen = set()
    for task in m.tasks:
        if task in seen:
            refuse(f"task {task!r} is listed twice")
        seen.add(task)
        if task in taken:  # never say which site holds it: a site learns nothing of the others
            refuse(f"task {task!r} is already held by another site; task names must be unique across sites")


def _chunks_of(parts: list[dict]) -> set[str]:
    return {c for part in parts for c in part["chunks"]}


def _spectra_numbers(file: Path, modules: list[ModuleEntry]) -> int:
    """The LoRA numbers of a (checked) spectra payload's tasks at their own ranks, from the ranks it carries."""
    with open_safetensors(file) as f:
        ranks = [int(read_tensor(f, file, f"{m.name}.ranks").sum()) for m in modules]
    return sum(r * (m.out_features + m.in_features) for r, m in zip(ranks, modules))


def check_parts(parts: list[dict], call: str = "commit") -> None:
    def refuse(reason: str):
        raise Refused(Reason.INVALID, f"{call}: {reason}")

    if not parts:
        refuse("no parts; commit at least one part")
    names = set()
    for p in parts:
        try:
            safe_name(p["name"], "part name")  # parts become file names
        except RMMError as e:
            refuse(str(e))
        if p["name"] in names:
            refuse(f"part {p['name']} is listed twice")
        names.add(p["name"])
        if not p["chunks"]:
            refuse(f"part {p['name']} lists no chunks")
        for digest in (p["sha256"], *p["chunks"]):
            if not SHA256.match(digest):
                refuse(f"part {p['name']}: {digest!r} is not a sha256 (64 lowercase hex digits)")


def assemble(chunks: Path, part: dict, out: Path) -> None:
    """Concatenate a part's chunks into `out`, checking its size and sha256 against the commit."""
    h, size = hashlib.sha256(), 0
    with open(out, "wb") as f:
        for digest in part["chunks"]:
            data = (chunks / digest).read_bytes()
            h.update(data)
            size += len(data)
            f.write(data)
    if (size, h.hexdigest()) != (part["size"], part["sha256"]):
        raise Refused(
            Reason.INVALID,
            f"part {part['name']}: its chunks make {size} bytes with sha256 {h.hexdigest()}, the commit says "
            f"{part['size']} bytes with sha256 {part['sha256']}; list the part's chunks in order",
        )
