"""The coordinator's durable state of one federation, under `state_dir/<federation id>/`:

    config.json                            the federation config as first served
    created.json                           creation time: deadlines count from it across restarts
    sites/<site>/manifest.json             the joined SiteManifest (protobuf JSON)
    sites/<site>/chunks/<sha256>           uploaded chunks, content-addressed, kept across restarts; dropped
                                           when the site commits (its round's uploads end) or publishes them
    sites/<site>/parts/<name>.safetensors  the assembled parts, in place only at a successful commit
    sites/<site>/commit.json               the commit (parts, tasks, time); written last, so it marks it
    sites/<site>/traffic.json              bytes received from and sent to the site
    sites/<site>/curves/parts/, commit.json  method "auto" only: the site's second upload (curves)
    bases/bases.safetensors, bases.json    method "auto" only: the joint bases of round 1; state CURVES
    result/basis.safetensors, result.json  DONE with the basis (for "auto": the plan), or FAILED with why
    result/coefficients/<task>.safetensors the tasks their sites chose to publish (Publish), their
    result/extras/<task>.safetensors       extras, and a bundle manifest listing them: result/ is then
    result/manifest.json                   a standard bundle of those tasks, which `rmm revert` reads

Every file is written under a temporary name and renamed into place (fsynced first), so a
coordinator killed at any moment restarts from whole files: an acknowledged chunk is on disk, a
commit is complete or absent, a result is complete or absent. Leftover temporaries are removed
on start.

Methods that write run in worker threads (`asyncio.to_thread`); `_lock` orders the few steps that
must not interleave: a commit landing, a join, a publication, and the federation closing for aggregation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import grpc
import torch
from google.protobuf import json_format
from pydantic import ValidationError

from coordinator.config import MAX_CHUNK, FederationConfig
from protos.rmm.v1 import federation_pb2 as pb
from rmm import __version__
from rmm.adapter import lora_scaling, module_name
from rmm.bundle import BASIS_FILE, FACTORS, Manifest, ModuleEntry, Report, Storage, TaskEntry, coefficients_file, extras_file, file_hashes, read_manifest
from rmm.errors import RMMError
from rmm.io import atomic_dir, open_safetensors, read_all, read_tensor, safe_name, sha256_file
from rmm.merge import coef_specs, plan_modules
from rmm.payload import aggregate, check_round_payload, read_payload, write_bases, write_plan

SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Refused(Exception):
    """A call refused with a gRPC status code and a message that says what to do. Nothing changed."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


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


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class FederationState:
    def __init__(self, state_dir: Path, config: FederationConfig):
        self.config = config
        self.dir = Path(state_dir) / config.id
        self._lock = threading.Lock()
        self.closing: str | None = None  # why the federation closed, until its result is written; in memory only
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()
        self._check_config()
        created = self.dir / "created.json"
        if not created.exists():
            _write_json(created, {"created": time.time()})
        self.created: float = json.loads(created.read_text())["created"]
        self.manifests: dict[str, pb.SiteManifest] = {}
        self.commits: dict[str, dict] = {}
        self.curves: dict[str, dict] = {}  # method "auto": the second round's commits
        self.traffic: dict[str, dict[str, int]] = {}
        # Per site, the uploaded chunks no commit has consumed yet (sha256 -> bytes) and their total, for max_pending_bytes.
        self.pending: dict[str, dict[str, int]] = {}
        self.pending_bytes: dict[str, int] = {}
        for site_dir in sorted((self.dir / "sites").glob("*")):
            self._load_site(site_dir.name, site_dir)
        bases = self.dir / "bases" / "bases.json"
        self.bases: dict | None = json.loads(bases.read_text()) if bases.exists() else None
        result = self.dir / "result" / "result.json"
        self.result: dict | None = json.loads(result.read_text()) if result.exists() else None
        bundle = self.dir / "result"
        self.published: dict[str, TaskEntry] = {t.name: t for t in read_manifest(bundle).tasks} if (bundle / "manifest.json").exists() else {}

    def _remove_temporaries(self) -> None:
        # Temporary files, commit staging and atomic_dir's result directory of a killed coordinator.
        for p in sorted(self.dir.rglob(".*"), reverse=True):  # children before their directories
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

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
        for store, where in ((self.commits, site_dir), (self.curves, site_dir / "curves")):
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

    # -- what the federation is waiting for ------------------------------------------------------

    @property
    def state(self) -> str:
        """OPEN (collecting uploads), CURVES (method auto: bases out, collecting curves), DONE or FAILED."""
        if self.result:
            return self.result["state"]
        return "CURVES" if self.bases else "OPEN"

    @property
    def deadline(self) -> float:
        return self.created + self.config.deadline_seconds

    def missing_sites(self) -> list[str]:
        return [s for s in self.config.sites if s not in self.commits]

    def missing_curves(self) -> list[str]:
        return [s for s in self.bases["sites"] if s not in self.curves] if self.bases else []

    def message(self) -> str:
        """What the federation is doing, for any site: counts only, never another site's name."""
        if self.result:
            return self.result["message"]
        if self.closing:
            return self.closing
        if self.bases:
            left = max(0.0, self.bases["finished"] + self.config.deadline_seconds - time.time())
            return f"bases ready; waiting for the curves of {len(self.missing_curves())} of {len(self.bases['sites'])} sites, deadline in {left:.0f} s"
        return (
            f"waiting: {len(self.commits)} of {len(self.config.sites)} sites committed, "
            f"min_sites={self.config.min_sites}, deadline in {max(0.0, self.deadline - time.time()):.0f} s"
        )

    def due(self, now: float) -> list[str] | str | None:
        """Whether to close now: the sites to aggregate, or why the federation fails, or None to wait.

        Closing is final for this process: later commits are refused, so the basis covers exactly
        the sites it names.
        """
        with self._lock:
            if self.result or self.closing:
                return None
            if self.bases:  # method auto, second round: every site of the bases, or fail at its deadline
                if not self.missing_curves():
                    self.closing = f"allocating the storage budget over {len(self.bases['tasks'])} tasks"
                    return list(self.bases["sites"])
                if now < self.bases["finished"] + self.config.deadline_seconds:
                    return None
                self.closing = f"deadline passed without the curves of {len(self.missing_curves())} of {len(self.bases['sites'])} sites"
                return self.closing
            if self.missing_sites() and now < self.deadline:
                return None
            if len(self.commits) >= self.config.min_sites:
                sites = sorted(self.commits)
                self.closing = f"aggregating {len(sites)} sites"
                return sites
            self.closing = f"deadline passed: {len(self.commits)} of min_sites={self.config.min_sites} sites committed"
            return self.closing

    # -- calls ------------------------------------------------------------------------------------

    def join(self, site: str, manifest: pb.SiteManifest) -> str:
        _check_tasks(self.config, manifest)
        with self._lock:
            before = self.manifests.get(site)
            if before == manifest:
                return "joined again (same manifest)"
            if self.result or self.closing:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"federation {self.config.id} is closed ({self.message()}); it takes no more joins")
            if site in self.commits:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"site {site} already committed with another manifest; a commit is final")
            _check_manifest(self.config, manifest, {t for s, m in self.manifests.items() if s != site for t in m.tasks})
            site_dir = self.dir / "sites" / site
            site_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(site_dir / "manifest.json", json_format.MessageToJson(manifest).encode())
            self.manifests[site] = manifest
            return "joined" if before is None else "joined with a new manifest"

    def missing_chunks(self, site: str, digests: list[str]) -> list[str]:
        self._joined(site)
        bad = [d for d in digests if not SHA256.match(d)]
        if bad:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{bad[0]!r} is not a sha256 (64 lowercase hex digits)")
        # The current round's commit consumed its chunks: their bytes are in the committed parts.
        current = self.curves.get(site) if self.bases and site in self.bases["sites"] else self.commits.get(site)
        held = _chunks_of(current["parts"]) if current else set()
        chunks = self.dir / "sites" / site / "chunks"
        return [d for d in digests if d not in held and not (chunks / d).is_file()]

    def store_chunk(self, site: str, digest: str, data: bytes) -> bool:
        """Store one chunk; True when it was already stored."""
        self._joined(site)
        if not (site in self.commits and self.state == "DONE"):  # after DONE, a committed site uploads only to publish
            self._still_uploading(site)
        if len(data) > MAX_CHUNK:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"chunk of {len(data)} bytes exceeds the {MAX_CHUNK}-byte limit; split parts into smaller chunks")
        if not SHA256.match(digest):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{digest!r} is not a sha256 (64 lowercase hex digits)")
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"chunk sha256 is {actual}, not {digest} as sent; the chunk was damaged, send it again")
        chunks = self.dir / "sites" / site / "chunks"
        with self._lock:
            used = self.pending_bytes.get(site, 0)
            if digest not in self.pending.get(site, {}) and used + len(data) > self.config.max_pending_bytes:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"site {site} already holds {used} bytes of uploaded chunks that no commit has consumed, and the federation's "
                    f"max_pending_bytes is {self.config.max_pending_bytes}; commit what is uploaded, or ask the operator to raise it",
                )
        chunks.mkdir(exist_ok=True)
        already = (chunks / digest).is_file()
        if not already:
            write_atomic(chunks / digest, data)
        with self._lock:
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
        """The site's upload of the current round: its payload parts, or (method auto, state CURVES) its curves."""
        manifest = self._joined(site)
        record = [{"name": p.name, "chunks": list(p.chunks), "sha256": p.sha256, "size": p.size} for p in parts]
        first = self.commits.get(site)
        if first is not None and (self.bases is None or site not in self.bases["sites"] or first["parts"] == record):
            return self._same_commit(first, site, record)
        if first is not None:
            if site in self.curves:
                return self._same_commit(self.curves[site], site, record)
            self._still_uploading(site)
            return self._land(site, record, manifest, self.curves, self.dir / "sites" / site / "curves", "curves")
        self._still_uploading(site)
        return self._land(site, record, manifest, self.commits, self.dir / "sites" / site, manifest.upload_kind)

    def _land(self, site: str, record: list[dict], manifest: pb.SiteManifest, store: dict, where: Path, kind: str) -> str:
        """Assemble and check the parts from the site's chunks, then make the commit durable in `where`."""
        _check_parts(record)
        chunks = self.dir / "sites" / site / "chunks"
        wanted = {c for part in record for c in part["chunks"]}
        missing = [c for c in wanted if not (chunks / c).is_file()]
        if missing:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{len(missing)} of {len(wanted)} chunks are not stored; upload them (MissingChunks lists them) and commit again",
            )
        where.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".commit-", dir=where))
        try:
            tasks = numbers = 0
            for part in record:
                file = staging / f"{part['name']}.safetensors"
                _assemble(chunks, part, file)
                tasks += self._check_payload(file, part["name"], manifest, kind)
                numbers += _spectra_numbers(file, self.config.modules) if kind == "spectra" else 0
            if tasks != len(manifest.tasks):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the parts hold {tasks} tasks, the manifest lists {len(manifest.tasks)}; upload every task's share once")
            # The budget of method auto is a share of every site's LoRA numbers: the ranks uploaded must give what was declared.
            if kind == "spectra" and numbers != manifest.lora_numbers:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the manifest's lora_numbers {manifest.lora_numbers} differ from the {numbers} the spectra's ranks give; "
                    f"join again with {numbers}",
                )
            with self._lock:
                if site in store:  # a concurrent retry of this commit landed first
                    return self._same_commit(store[site], site, record)
                if self.manifests[site] is not manifest:
                    raise Refused(grpc.StatusCode.ABORTED, "the site joined again with another manifest during this commit; commit again")
                self._still_uploading(site)
                shutil.rmtree(where / "parts", ignore_errors=True)
                staging.rename(where / "parts")
                store[site] = {"parts": record, "tasks": tasks, "committed": time.time()}
                _write_json(where / "commit.json", store[site])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self._lock:  # the commit ends the site's uploads for this round: what its parts did not use is stale
            self._drop_chunks(site, set(self.pending.get(site, {})))
        return f"committed {len(record)} {kind} parts, {tasks} tasks"

    def publish(self, site: str, tasks: list[pb.PublishedTask]) -> str:
        """Store the site's own tasks' coefficients (and extras) in result/ and list them in its manifest."""
        manifest = self._joined(site)
        if self.state != "DONE" or site not in self.result["sites"]:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"only a site aggregated into a DONE federation can publish; federation {self.config.id} is {self.state}: {self.message()}",
            )
        if not tasks:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "publish: no tasks; publish at least one")
        own, names = set(manifest.tasks), set()
        for t in tasks:
            if t.name not in own:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"task {t.name!r} is not one of site {site}'s tasks; a site publishes only its own")
            if t.name in names:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"publish: task {t.name} is listed twice")
            names.add(t.name)
        result = self.dir / "result"
        staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=result))
        try:
            new = {t.name: (t, self._check_published(t, staging, self.dir / "sites" / site / "chunks")) for t in tasks}
            with self._lock:
                # Already published, by an earlier call or a concurrent retry of this one: same content or refused.
                new = {name: entry for name, (t, entry) in new.items() if not self._same_published(t, entry)}
                for name in new:
                    for file in (coefficients_file, extras_file):
                        if file(staging, name).exists():
                            file(result, name).parent.mkdir(exist_ok=True)
                            file(staging, name).replace(file(result, name))
                published = self.published | new
                write_atomic(result / "manifest.json", self._bundle_manifest(published).model_dump_json(indent=2).encode())
                self.published = published
                self._drop_chunks(site, {c for t in tasks for part in (t.coefficients, t.extras) for c in part.chunks})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return f"published {len(new)} of {len(tasks)} tasks" + (" (the others again, same content)" if len(new) < len(tasks) else "")

    def _check_published(self, t: pb.PublishedTask, staging: Path, chunks: Path) -> TaskEntry:
        """The task's entry, once its parts are assembled in `staging` and fit the basis."""
        def bad(reason: str) -> Refused:
            return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"publish {t.name}: {reason}")

        try:
            entry = TaskEntry.model_validate_json(t.task_json)
        except ValidationError as e:
            raise bad(f"task_json is not a bundle task entry ({e.errors()[0]['msg']})") from None
        if entry.name != t.name or Path(t.name).name != t.name or t.name.startswith("."):
            raise bad(f"task_json names {entry.name!r}; the name must be the task's and usable as a file name")
        if t.HasField("extras") != bool(entry.extras):
            raise bad("send an extras part exactly when the task entry lists extras")
        modules = [ModuleEntry(**m) for m in self.result["modules"]]
        coefs = {k: shape for k, (_, shape) in coef_specs(modules, torch.float32, t.name).items()}
        files = [(t.coefficients, coefficients_file(staging, t.name), coefs)]
        if entry.extras:
            files.append((t.extras, extras_file(staging, t.name), dict.fromkeys(entry.extras)))
        for part, file, shapes in files:
            record = {"name": file.parent.name, "chunks": list(part.chunks), "sha256": part.sha256, "size": part.size}
            _check_parts([record], f"publish {t.name}")
            if t.name in self.published:
                continue  # compared with the stored files under the lock instead
            missing = [c for c in record["chunks"] if not (chunks / c).is_file()]
            if missing:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"publish {t.name}: {len(missing)} chunks are not stored; upload them first")
            file.parent.mkdir(exist_ok=True)
            _assemble(chunks, record, file)
            try:
                tensors = read_all(file)
            except RMMError as e:
                raise bad(f"{record['name']}: {e.reason}") from None
            if tensors.keys() != shapes.keys():
                raise bad(f"{record['name']} holds {len(tensors)} tensors, not the {len(shapes)} expected ({sorted(shapes.keys() ^ tensors.keys())[0]} differs)")
            for key, shape in shapes.items():
                x = tensors[key]
                if shape is not None and (tuple(x.shape) != shape or not x.is_floating_point() or not torch.isfinite(x).all()):
                    raise bad(f"coefficients {key} are {x.dtype} {tuple(x.shape)}; the basis needs finite floats of shape {shape}")
        return entry

    def _same_published(self, t: pb.PublishedTask, entry: TaskEntry) -> bool:
        """False for a new task; True when it is published with this content; refused otherwise."""
        if t.name not in self.published:
            return False
        bundle = self.dir / "result"
        extras = sha256_file(extras_file(bundle, t.name)) if self.published[t.name].extras else ""
        if (self.published[t.name], sha256_file(coefficients_file(bundle, t.name)), extras) != (entry, t.coefficients.sha256, t.extras.sha256):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"task {t.name} is already published with other content; a publication is final")
        return True

    def _bundle_manifest(self, published: dict[str, TaskEntry]) -> Manifest:
        """The bundle of the basis and the published tasks, its report from what the coordinator knows."""
        bundle, r = self.dir / "result", self.result
        # A truncated module lists the ranks of the published tasks only: what the bundle stores.
        modules = [
            m.model_copy(update={"ranks": {t: m.ranks[t] for t in published}}) if m.ranks else m
            for m in (ModuleEntry(**m) for m in r["modules"])
        ]
        files = [bundle / BASIS_FILE, *(coefficients_file(bundle, t) for t in published)]
        numbers, size = (sum(c) for c in zip(*map(_tensor_counts, files)))
        originals = {
            t.name: sum(lora_scaling(t.config, module_name(m.name))[0] * (m.out_features + m.in_features) for m in modules) for t in published.values()
        }
        original_bytes = sum(n * getattr(torch, published[t].dtype).itemsize for t, n in originals.items())
        tasks = [published[t] for t in r["tasks"] if t in published]
        storage = Storage(
            numbers_stored=numbers, numbers_original=sum(originals.values()), ratio=numbers / sum(originals.values()),
            bytes_stored=size, bytes_original=original_bytes,
        )
        return Manifest(
            tool_version=__version__,
            created=_iso(r["finished"]),
            options=self.config.merge_options(),
            storage_dtype=self.config.basis_dtype,
            tasks=tasks,
            modules=modules,
            basis_sha256=r["basis_sha256"],
            files=file_hashes(bundle, tasks),
            # Errors are measured by the sites and stay there; the energy is the coordinator's own.
            report=Report(storage=storage, errors={}, energy=r["energy"], seconds={}),
        )

    def count(self, site: str, *, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            t = self.traffic.setdefault(site, {"bytes_received": 0, "bytes_sent": 0})
            t["bytes_received"] += received
            t["bytes_sent"] += sent
            (self.dir / "sites" / site).mkdir(parents=True, exist_ok=True)
            _write_json(self.dir / "sites" / site / "traffic.json", t)

    def download(self) -> tuple[Path, str, int]:
        """What DownloadBasis serves now, its sha256 and size: the basis (DONE) or the bases (CURVES)."""
        if self.state == "CURVES":
            return self.dir / "bases" / "bases.safetensors", self.bases["basis_sha256"], self.bases["basis_size"]
        if self.state != "DONE":
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"federation {self.config.id} is {self.state}, not DONE: {self.message()}; wait with Status")
        return self.dir / "result" / BASIS_FILE, self.result["basis_sha256"], self.result["basis_size"]

    def _joined(self, site: str) -> pb.SiteManifest:
        if site not in self.manifests:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"site {site} has not joined federation {self.config.id}; call Join first")
        return self.manifests[site]

    def _still_uploading(self, site: str) -> None:
        if self.result or self.closing:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"federation {self.config.id} closed ({self.message()}); it takes no more uploads")
        if self.bases and site not in self.bases["sites"]:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"site {site} is not in this federation's bases (it committed too late); nothing more to upload")
        if site in (self.curves if self.bases else self.commits):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"site {site} already committed; nothing more to upload")

    def _same_commit(self, commit: dict, site: str, record: list[dict]) -> str:
        if commit["parts"] != record:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"site {site} already committed other parts; a commit is final")
        return "committed again (same parts)"

    def _check_payload(self, file: Path, name: str, manifest: pb.SiteManifest, kind: str) -> int:
        """The part's task count, once it reads as a payload of `kind` that fits every module."""
        def bad(reason: str) -> Refused:
            return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"part {name}: {reason}")

        try:
            with open_safetensors(file) as f:
                meta = f.metadata() or {}
            if meta.get("kind") != kind:
                raise bad(f"payload kind {meta.get('kind')!r}, but this upload takes {kind!r}")
            if kind in ("spectra", "curves"):
                bases = self.dir / "bases" / "bases.safetensors" if kind == "curves" else None
                return len(check_round_payload(file, kind, self.config.modules, list(manifest.tasks), bases))
            n = int(meta.get("n", "0"))
            for module, moments in zip(self.config.modules, read_payload(file, self.config.modules)):
                for factor, positions in zip(FACTORS, (module.out_features, module.in_features)):
                    m, r = moments[factor], module.rank
                    if m.n != n or m.s1.shape != (positions, r) or m.s2.shape != (positions, r, r):
                        raise bad(f"module {module.name} factor {factor} does not fit {positions} positions of rank {r} for {n} tasks")
                    if not (torch.isfinite(m.s1).all() and torch.isfinite(m.s2).all()):
                        raise bad(f"module {module.name} factor {factor} holds NaN or infinite values")
        except RMMError as e:
            raise bad(f"not a valid {kind} payload: {e.reason}" + (f" (module {e.module})" if e.module else "")) from None
        except ValueError as e:
            raise bad(f"not a valid {kind} payload: {e}") from None
        return n

    # -- closing ----------------------------------------------------------------------------------

    def aggregate(self, sites: list[str]) -> None:
        """Close the current round with these sites' uploads.

        rmm-paper: plan the basis sizes for the committed tasks, sum every part's moments and solve; DONE.
        auto, first round: the joint bases from the sites' spectra; CURVES. auto, second round:
        allocate the budget from the spectra and curves; DONE with the plan as the basis file.
        """
        started = time.time()
        clock = time.perf_counter()
        manifests = [self.manifests[s] for s in sites]
        tasks = [t for m in manifests for t in m.tasks]
        parts = self._parts(sites, "")
        if self.config.method == "auto" and not self.bases:
            return self._write_bases(sites, tasks, parts, started, clock)
        with atomic_dir(self.dir / "result") as tmp:
            if self.config.method == "auto":
                budget = self.config.merge_options().storage_ratio * sum(m.lora_numbers for m in manifests)
                modules, energy = write_plan(parts, self._parts(sites, "curves"), self.config.modules, budget,
                                             self.dir / "bases" / "bases.safetensors", tmp / BASIS_FILE, getattr(torch, self.config.basis_dtype))
            else:
                modules = plan_modules(self.config.modules, len(tasks), sum(m.lora_numbers for m in manifests), self.config.merge_options())
                energy = aggregate(parts, modules, tmp / BASIS_FILE, getattr(torch, self.config.basis_dtype))
            solved = time.perf_counter()
            result = {
                "state": "DONE",
                "message": f"aggregated {len(tasks)} tasks of {len(sites)} sites",
                "sites": sites,
                "tasks": tasks,
                "modules": [m.model_dump() for m in modules],
                "energy": energy,
                "basis_sha256": sha256_file(tmp / BASIS_FILE),
                "basis_size": (tmp / BASIS_FILE).stat().st_size,
                "seconds": (self.bases or {}).get("seconds", {}) | {"collect": started - self.created, "aggregate": solved - clock, "hash": time.perf_counter() - solved},
                "finished": time.time(),
            }
            _write_json(tmp / "result.json", result)
        self.result = result

    def _parts(self, sites: list[str], round_dir: str) -> list[Path]:
        """The committed part files of `sites`: first uploads (round_dir "") or curves ("curves")."""
        store = self.curves if round_dir else self.commits
        return [self.dir / "sites" / s / round_dir / "parts" / f"{p['name']}.safetensors" for s in sites for p in store[s]["parts"]]

    def _write_bases(self, sites: list[str], tasks: list[str], parts: list[Path], started: float, clock: float) -> None:
        """Method auto, end of the first round: the joint bases every site needs for its curves; CURVES."""
        with atomic_dir(self.dir / "bases") as tmp:
            write_bases(parts, self.config.modules, tmp / "bases.safetensors")
            bases = {
                "sites": sites,
                "tasks": tasks,
                "basis_sha256": sha256_file(tmp / "bases.safetensors"),
                "basis_size": (tmp / "bases.safetensors").stat().st_size,
                "seconds": {"collect": started - self.created, "bases": time.perf_counter() - clock},
                "finished": time.time(),
            }
            _write_json(tmp / "bases.json", bases)
        with self._lock:
            self.bases, self.closing = bases, None  # open again, for the curves

    def fail(self, message: str) -> None:
        with atomic_dir(self.dir / "result") as tmp:
            result = {"state": "FAILED", "message": message, "sites": sorted(self.commits), "finished": time.time()}
            _write_json(tmp / "result.json", result)
        self.result = result

    def report(self, site: str) -> dict:
        """The federation's state and the calling site's own row: a site learns nothing of another's tasks or traffic."""
        r = self.result or {}
        manifest, commit, traffic = self.manifests.get(site), self.commits.get(site), self.traffic.get(site, {})
        sites = {
            site: {
                "joined": manifest is not None,
                "tasks": len(manifest.tasks) if manifest else 0,
                "upload_kind": manifest.upload_kind if manifest else None,
                "committed": _iso(commit["committed"]) if commit else None,
                "bytes_received": traffic.get("bytes_received", 0),
                "bytes_sent": traffic.get("bytes_sent", 0),
            }
        }
        return {
            "federation": self.config.id,
            "state": self.state,
            "message": self.message(),
            "created": _iso(self.created),
            "deadline": _iso(self.deadline),
            "finished": _iso(r.get("finished")),
            "min_sites": self.config.min_sites,
            "sites": sites,
            "aggregated_sites": r.get("sites", []),
            "modules": r.get("modules", []),
            "energy": r.get("energy", {}),
            "basis_sha256": r.get("basis_sha256"),
            "basis_size": r.get("basis_size"),
            "seconds": r.get("seconds", {}),
        }


def _check_tasks(config: FederationConfig, m: pb.SiteManifest) -> None:
    """Task names become file names (coefficients/<task>.safetensors): each must be one; at most max_tasks."""
    if len(m.tasks) > config.max_tasks:
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the manifest lists {len(m.tasks)} tasks; the federation's max_tasks is {config.max_tasks}")
    for task in m.tasks:
        try:
            safe_name(task)
        except RMMError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None


def _check_manifest(config: FederationConfig, m: pb.SiteManifest, taken: set[str]) -> None:
    """Refuse a manifest that does not fit the federation; `taken`: the other sites' tasks."""
    def refuse(reason: str):
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"manifest does not match federation {config.id}: {reason}")

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
            refuse(f"module {x.name} has shape {x.out_features}x{x.in_features}, the federation's is {want.out_features}x{want.in_features}")
        if not 1 <= x.rank <= want.rank:
            refuse(f"module {x.name} has rank {x.rank}, the federation allows 1 to {want.rank}")
    if m.upload_kind not in config.upload_kinds and config.method == "auto":
        refuse(f"the federation uses method auto, whose sites upload 'spectra' (rmm site run --method auto), not {m.upload_kind!r}")
    if m.upload_kind not in config.upload_kinds:
        refuse(f"upload_kind {m.upload_kind!r} is not allowed; the federation allows {', '.join(config.upload_kinds)}")
    if m.upload_kind == "sketch" and m.sketch_rank < 1:
        refuse(f"upload_kind 'sketch' needs sketch_rank >= 1, got {m.sketch_rank}")
    if m.canonicalize != config.canonicalize:
        refuse(f"canonicalize is {m.canonicalize}, the federation's is {config.canonicalize}; prepare the factors the same way")
    if not m.tasks:
        refuse("it lists no tasks")
    # The budget is a share of the sites' LoRA numbers: each task holds every module at a rank from 1 to the site's.
    least = len(m.tasks) * sum(x.out_features + x.in_features for x in m.modules)
    most = len(m.tasks) * sum(x.rank * (x.out_features + x.in_features) for x in m.modules)
    if not least <= m.lora_numbers <= most:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"lora_numbers {m.lora_numbers} is impossible for {len(m.tasks)} tasks on these modules and ranks ({least} to {most}); "
            "give the LoRA numbers of the site's adapters",
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
        return sum(int(read_tensor(f, file, f"{m.name}.ranks").sum()) * (m.out_features + m.in_features) for m in modules)


def _check_parts(parts: list[dict], call: str = "commit") -> None:
    def refuse(reason: str):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{call}: {reason}")

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


def _tensor_counts(file: Path) -> tuple[int, int]:
    """Numbers and bytes of a safetensors file's tensors, from its header."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    return sum(math.prod(v["shape"]) for v in tensors), sum(v["data_offsets"][1] - v["data_offsets"][0] for v in tensors)


def _assemble(chunks: Path, part: dict, out: Path) -> None:
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
            grpc.StatusCode.INVALID_ARGUMENT,
            f"part {part['name']}: its chunks make {size} bytes with sha256 {h.hexdigest()}, the commit says {part['size']} bytes "
            f"with sha256 {part['sha256']}; list the part's chunks in order",
        )
