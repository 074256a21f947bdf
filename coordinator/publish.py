"""Publishing (opt-in): sites of a DONE federation send their own tasks' coefficients, and result/ becomes
a standard bundle of those tasks, which `rmm revert` reads:

    result/coefficients/<task>.safetensors  the published tasks' coefficients
    result/extras/<task>.safetensors        and extras (e.g. heads saved whole)
    result/manifest.json                    the bundle manifest listing them, rewritten at each publication
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError

from coordinator.state import FederationState, Phase, Reason, Refused, assemble, check_parts, iso, write_atomic
from protos.rmm.v1 import federation_pb2 as pb
from rmm import __version__
from rmm.adapter import lora_scaling, module_name
from rmm.bundle import BASIS_FILE, Manifest, ModuleEntry, Report, Storage, TaskEntry, read_manifest
from rmm.bundle import coefficients_file, extras_file
from rmm.errors import RMMError
from rmm.io import read_all, tensor_counts
from rmm.storage import coef_specs


class Publication:
    """The published tasks of one federation, in its result/ directory."""

    def __init__(self, fed: FederationState):
        self.fed, self.dir = fed, fed.dir / "result"
        manifest = read_manifest(self.dir) if (self.dir / "manifest.json").exists() else None
        self.tasks: dict[str, TaskEntry] = {t.name: t for t in manifest.tasks} if manifest else {}
        # sha256 of every file of result/, by its path there: recorded once, when its part is assembled (and checked)
        self.files: dict[str, str] = manifest.files if manifest else {}

    def publish(self, site: str, tasks: list[pb.PublishedTask]) -> str:
        """Store the site's own tasks' coefficients (and extras) in result/ and list them in its manifest."""
        fed = self.fed
        manifest = fed.joined(site)
        if fed.progress.phase is not Phase.DONE or site not in fed.progress.sites:
            raise Refused(
                Reason.PRECONDITION,
                f"only a site aggregated into a DONE federation can publish; federation {fed.config.id} is "
                f"{fed.state}: {fed.message()}",
            )
        if not tasks:
            raise Refused(Reason.INVALID, "publish: no tasks; publish at least one")
        own, names = set(manifest.tasks), set()
        for t in tasks:
            if t.name not in own:
                raise Refused(
                    Reason.DENIED,
                    f"task {t.name!r} is not one of site {site}'s tasks; a site publishes only its own",
                )
            if t.name in names:
                raise Refused(Reason.INVALID, f"publish: task {t.name} is listed twice")
            names.add(t.name)
        staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=self.dir))
        try:
            new = {t.name: (t, self._check(t, staging, fed.dir / "sites" / site / "chunks")) for t in tasks}
            with fed.lock:
                # Already published, by an earlier call or a concurrent retry of this one: same content or refused.
                new = {name: (t, entry) for name, (t, entry) in new.items() if not self._same(t, entry)}
                for name in new:
                    for file in (coefficients_file, extras_file):
                        if file(staging, name).exists():
                            file(self.dir, name).parent.mkdir(exist_ok=True)
                            file(staging, name).replace(file(self.dir, name))
                published, files = self.tasks | {name: entry for name, (_, entry) in new.items()}, dict(self.files)
                for name, (t, entry) in new.items():
                    files[_path(coefficients_file, name)] = t.coefficients.sha256
                    if entry.extras:
                        files[_path(extras_file, name)] = t.extras.sha256
                manifest = self._bundle_manifest(published, files)
                write_atomic(self.dir / "manifest.json", manifest.model_dump_json(indent=2).encode())
                self.tasks, self.files = published, files
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        fed.consume(site, {c for t in tasks for part in (t.coefficients, t.extras) for c in part.chunks})
        again = " (the others again, same content)" if len(new) < len(tasks) else ""
        return f"published {len(new)} of {len(tasks)} tasks{again}"

    def _check(self, t: pb.PublishedTask, staging: Path, chunks: Path) -> TaskEntry:
        """The task's entry, once its parts are assembled in `staging` and fit the basis."""

        def bad(reason: str) -> Refused:
            return Refused(Reason.INVALID, f"publish {t.name}: {reason}")

        try:
            entry = TaskEntry.model_validate_json(t.task_json)
        except ValidationError as e:
            raise bad(f"task_json is not a bundle task entry ({e.errors()[0]['msg']})") from None
        if entry.name != t.name:  # TaskEntry itself holds its name to the file-name rule
            raise bad(f"task_json names {entry.name!r}; the name must be the task's")
        if t.HasField("extras") != bool(entry.extras):
            raise bad("send an extras part exactly when the task entry lists extras")
        modules = [ModuleEntry(**m) for m in self.fed.result["modules"]]
        coefs = {k: shape for k, (_, shape) in coef_specs(modules, torch.float32, t.name).items()}
        files = [(t.coefficients, coefficients_file(staging, t.name), coefs)]
        if entry.extras:
            files.append((t.extras, extras_file(staging, t.name), dict.fromkeys(entry.extras)))
        for part, file, shapes in files:
            record = {"name": file.parent.name, "chunks": list(part.chunks), "sha256": part.sha256, "size": part.size}
            check_parts([record], f"publish {t.name}")
            if t.name in self.tasks:
                continue  # compared with the stored files under the lock instead
            missing = [c for c in record["chunks"] if not (chunks / c).is_file()]
            if missing:
                raise Refused(
                    Reason.PRECONDITION,
                    f"publish {t.name}: {len(missing)} chunks are not stored; upload them first",
                )
            file.parent.mkdir(exist_ok=True)
            assemble(chunks, record, file)
            try:
                tensors = read_all(file)
            except RMMError as e:
                raise bad(f"{record['name']}: {e.reason}") from None
            if tensors.keys() != shapes.keys():
                raise bad(
                    f"{record['name']} holds {len(tensors)} tensors, not the {len(shapes)} expected "
                    f"({sorted(shapes.keys() ^ tensors.keys())[0]} differs)",
                )
            for key, shape in shapes.items():
                x = tensors[key]
                fits = shape is None or (tuple(x.shape) == shape and x.is_floating_point() and torch.isfinite(x).all())
                if not fits:
                    raise bad(
                        f"coefficients {key} are {x.dtype} {tuple(x.shape)}; the basis needs finite floats of shape "
                        f"{shape}",
                    )
        return entry

    def _same(self, t: pb.PublishedTask, entry: TaskEntry) -> bool:
        """False for a new task; True when it is published with this content; refused otherwise."""
        if t.name not in self.tasks:
            return False
        extras = self.files[_path(extras_file, t.name)] if self.tasks[t.name].extras else ""
        stored = (self.tasks[t.name], self.files[_path(coefficients_file, t.name)], extras)
        if stored != (entry, t.coefficients.sha256, t.extras.sha256):
            raise Refused(
                Reason.PRECONDITION,
                f"task {t.name} is already published with other content; a publication is final",
            )
        return True

    def _bundle_manifest(self, published: dict[str, TaskEntry], files: dict[str, str]) -> Manifest:
        """The bundle of the basis and the published tasks, its report from what the coordinator knows."""
        fed, r = self.fed, self.fed.result
        # A truncated module lists the ranks of the published tasks only: what the bundle stores.
        modules = [
            m.model_copy(update={"ranks": {t: m.ranks[t] for t in published}}) if m.ranks else m
            for m in (ModuleEntry(**m) for m in r["modules"])
        ]
        stored = [self.dir / BASIS_FILE, *(coefficients_file(self.dir, t) for t in published)]
        numbers, size = (sum(c) for c in zip(*map(tensor_counts, stored)))
        originals = {
            t.name: sum(
                lora_scaling(t.config, module_name(m.name))[0] * (m.out_features + m.in_features) for m in modules
            )
            for t in published.values()
        }
        original_bytes = sum(n * getattr(torch, published[t].dtype).itemsize for t, n in originals.items())
        tasks = [published[t] for t in r["tasks"] if t in published]
        storage = Storage(
            numbers_stored=numbers,
            numbers_original=sum(originals.values()),
            ratio=numbers / sum(originals.values()),
            bytes_stored=size,
            bytes_original=original_bytes,
        )
        return Manifest(
            tool_version=__version__,
            created=iso(fed.progress.finished),
            options=fed.config.merge,
            storage_dtype=fed.config.basis_dtype,
            tasks=tasks,
            modules=modules,
            basis_sha256=r["basis_sha256"],
            files={BASIS_FILE: r["basis_sha256"]} | files,
            # Errors are measured by the sites and stay there; the energy is the coordinator's own.
            report=Report(storage=storage, errors={}, energy=r["energy"], seconds={}),
        )


def _path(file, task: str) -> str:
    """A task's file of the bundle by its path in it, as `Manifest.files` keys it."""
    return file(Path(), task).as_posix()
