"""A site in a federation: Ray actors hold shards of its adapters; a driver steers them.

Each actor (`SiteShard`) loads its shard in its constructor, so Ray can restart it (`max_restarts`) and it reloads
itself. It writes its payload (moments, sketch or factors; method auto: spectra, then curves) and uploads it in chunks.
In a calibrating federation each actor then measures every candidate plan on its own tasks' examples, and the driver
sends only each candidate's divergence summed over the site's tasks. Once the coordinator has the basis, each actor
downloads it, fits its own tasks' coefficients and writes its bundle and reverted PEFT adapters locally; only if the
site opts in does it then publish its tasks' coefficients to the coordinator. The driver (`run_site`) joins the
federation with the site's manifest, commits the actors' parts and waits. The manifest does not depend on how the
tasks are sharded, and a site restarted after a commit only waits (and sends what the round still needs), so it may
come back with other --actors or adapter order.
Actors compute on the device the site asks for (`--device`; auto: CUDA when the cluster has GPUs), each holding
a GPU only when that is CUDA; one actor per GPU then, otherwise one unless told. On a cluster they are placed on its
nodes in turn, and each reads its shard's files where it runs. The code path is the same.
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from pathlib import Path

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from protos.rmm.v1 import federation_pb2 as pb
from protos.rmm.v1.wire import Retry
from rmm import __version__
from rmm.adapter import open_adapters
from rmm.bundle import ModuleEntry, MergeOptions, coefficients_file, extras_file, read_manifest
from rmm.calibrate import Calibration, read_examples, summed
from rmm.device import DEVICES
from rmm.errors import RMMError, first_line
from rmm.merge import candidate_divergences, merge, revert
from rmm.payload import (
    smallest_exact_numbers,
    split_candidates,
    write_curves,
    write_divergences,
    write_payload,
    write_spectra,
)
from rmm.plan import module_specs, modules_of_basis, numbers_original
from workers.client import Credentials, FederationClient


class SiteShard:
    """One actor's share of a site's adapters."""

    def __init__(
        self,
        name: str,
        adapter_dirs: list[str],
        work_dir: str,
        address: str,
        federation_id: str,
        site_id: str,
        credentials: Credentials,
        retry: Retry = Retry(),
        threads: float = 1.0,
        device: str = "cpu",
    ):
        torch.set_num_threads(
            max(1, int(threads))
        )  # the actor holds no CPU slot (see run_site): it must not take every core
        self.name, self.work, self.device = name, Path(work_dir), torch.device(device)
        self.adapters = open_adapters(adapter_dirs)  # here, on the actor's node: the driver ships only the paths
        self.client = FederationClient(address, federation_id, site_id, credentials, retry=retry)

    def manifest(self) -> dict:
        on_node(self.device)  # the actor's first call
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "base_model": self.adapters[0].base_model or "",
            "modules": [m.model_dump() for m in module_specs(self.adapters)],
            "tasks": [a.name for a in self.adapters],
            "lora_numbers": numbers_original(self.adapters),
            "lora_bytes": sum(a.lora_bytes for a in self.adapters),
        }

    def upload(self, modules: list[dict], kind: str, q: int, canonical: bool) -> tuple[bytes, dict]:
        """Write this shard's payload against the federation's modules and send what the coordinator lacks."""
        entries = [ModuleEntry(**m) for m in modules]
        clock = time.perf_counter()
        self.work.mkdir(parents=True, exist_ok=True)
        file = self.work / f"{self.name}.payload.safetensors"
        if kind == "spectra":
            written = write_spectra(self.adapters, entries, file, device=self.device)
        else:
            written = write_payload(self.adapters, entries, file, kind, q=q, canonical=canonical, device=self.device)
        sketch = time.perf_counter() - clock
        clock = time.perf_counter()
        part = self.client.upload(file, self.name)
        positions = sum(m.out_features + m.in_features for m in entries)
        stats = {
            "sketch_seconds": sketch,
            "upload_seconds": time.perf_counter() - clock,
            "payload_numbers": written.numbers,
            "payload_bytes": file.stat().st_size,
            "smallest_exact_numbers": sum(
                smallest_exact_numbers(m.out_features + m.in_features, m.rank, len(self.adapters)) for m in entries
            ),
            "positions": positions,
            "bytes_sent": self.client.traffic.bytes_sent,
            "chunks_sent": self.client.traffic.chunks_sent,
            "chunks_skipped": self.client.traffic.chunks_skipped,
        }
        return part.SerializeToString(), stats

    def upload_curves(self, modules: list[dict]) -> tuple[bytes, int]:
        """Method auto, second round: download the bases, send this shard's curves; the part and bytes sent."""
        bases = self.client.download(self.work / "bases.safetensors", state="CURVES")
        file = self.work / f"{self.name}.curves.safetensors"
        write_curves(self.adapters, [ModuleEntry(**m) for m in modules], bases, file, device=self.device)
        sent = self.client.traffic.bytes_sent
        part = self.client.upload(file, self.name)
        return part.SerializeToString(), self.client.traffic.bytes_sent - sent

    def calibrate(self, calibration: Calibration) -> dict[str, float]:
        """With calibrate, third round: download every candidate plan's basis and measure each on this shard's tasks'
        examples; per candidate, the divergence summed over the shard's tasks (nothing per task leaves the actor)."""
        candidates = self.client.download(self.work / "candidates.safetensors", state="CALIBRATE")
        bases = split_candidates(candidates, self.work / "candidates")
        names, specs = [a.name for a in self.adapters], module_specs(self.adapters)
        plans = {name: modules_of_basis(file, specs, names, "auto") for name, file in bases.items()}
        examples = read_examples(calibration, names)
        per_task, _ = candidate_divergences(
            self.adapters, plans, calibration.base, examples, bases=bases, device=self.device
        )
        return summed(per_task)

    def finish(self, options: MergeOptions, out_dir: str) -> dict:
        """Download the basis, fit this shard's coefficients, write its bundle and reverted adapters."""
        clock = time.perf_counter()
        basis = self.client.download(self.work / "basis.safetensors")
        download = time.perf_counter() - clock
        clock = time.perf_counter()
        bundle = Path(out_dir) / "bundles" / self.name
        paths = [a.path for a in self.adapters]
        manifest = merge(paths, bundle, options, basis=basis, device=self.device, progress=False, force=True)
        # A site run again replaces its own output.
        revert(bundle, Path(out_dir) / "reverted", device=self.device, progress=False, force=True)
        return {
            "download_seconds": download,
            "revert_seconds": time.perf_counter() - clock,
            "bytes_received": self.client.traffic.bytes_received,
            "errors": manifest.report.errors,
        }

    def publish(self, out_dir: str) -> tuple[list[bytes], int]:
        """Upload this shard's coefficient (and extras) files; the tasks to publish, and the bytes sent."""
        bundle = Path(out_dir) / "bundles" / self.name
        sent = self.client.traffic.bytes_sent
        tasks = []
        for entry in read_manifest(bundle).tasks:
            coefficients = self.client.upload(coefficients_file(bundle, entry.name), "coefficients")
            extras = self.client.upload(extras_file(bundle, entry.name), "extras") if entry.extras else None
            public = entry.model_copy(update={"source": f"site {self.client.site_id}"})  # no local paths leave the site
            task = pb.PublishedTask(
                name=entry.name, task_json=public.model_dump_json(), coefficients=coefficients, extras=extras
            )
            tasks.append(task.SerializeToString())
        return tasks, self.client.traffic.bytes_sent - sent


def run_site(
    address: str,
    federation_id: str,
    site_id: str,
    credentials: Credentials,
    adapter_dirs: list[str | Path],
    out: str | Path,
    *,
    options: MergeOptions = MergeOptions(),
    upload: str = "auto",
    sketch_rank: int = 0,
    allow_factors: bool = False,
    actors: int | None = None,
    actor_cpus: float = 1.0,
    wait_timeout: float = 3600.0,
    retry: Retry = Retry(),
    publish_coefficients: bool = False,
    calibration: Calibration | None = None,
    device: str = "auto",
    gpu_share: float = 1.0,
    on_stage=lambda site, stage: None,
) -> dict:
    """Take part in a federation with `adapter_dirs`; returns the site's traffic, times and errors.

    `options`: the method and canonicalisation the site expects (the coordinator refuses them unless they are
    the federation's); the federation's config sets the budget.
    `calibration`: the base model and this site's examples, which a federation with calibrate needs (and one
    without refuses); they never leave the site.
    `retry`: how long every call keeps trying while the coordinator is unreachable (e.g. restarting).
    `actor_cpus`: the torch threads of each actor (actors reserve no CPU slot, so many sites can share a cluster).
    `device`: where the actors compute, auto|cpu|cuda (auto: CUDA when the cluster has GPUs); on CUDA each actor
    reserves `gpu_share` of a GPU (below 1, sites' actors share GPUs: they spend most of their time waiting).
    """
    if options.method == "auto" and upload not in ("auto", "spectra"):
        raise RMMError(
            f"method auto uploads spectra (singular values and Gram roots); --upload {upload} is for method rmm-paper"
        )
    if upload == "factors" and not allow_factors:
        raise RMMError("the 'factors' upload sends raw adapters to the coordinator; pass --allow-factors to opt in")
    if calibration is not None and options.method != "auto":
        raise RMMError("calibration chooses among method auto's plans; run the site with method auto")
    out = Path(out)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = actor_device(device, gpus)
    if not 0 < gpu_share <= 1:
        raise RMMError(f"a GPU share must be in (0, 1], got {gpu_share}")
    n = max(1, min(actors or (gpus if device == "cuda" else 1), len(adapter_dirs)))
    shards = [[str(d) for d in adapter_dirs[i::n]] for i in range(n)]
    # No CPU slot: an actor spends most of its life waiting for the other sites, and one that held a
    # slot meanwhile would keep other sites' actors from starting (many sites on one cluster deadlock).
    Actor = ray.remote(num_gpus=gpu_share if device == "cuda" else 0, num_cpus=0, max_restarts=2, max_task_retries=2)(
        SiteShard
    )
    slots = node_slots("GPU" if device == "cuda" else "CPU", each=device == "cuda")
    first = zlib.crc32(site_id.encode())  # many sites on one cluster: each starts on another node
    handles = [
        Actor.options(scheduling_strategy=on_slot(slots, first + i)).remote(
            f"{site_id}-{i}",
            shard,
            str(out / "work" / f"{i}"),
            address,
            federation_id,
            site_id,
            credentials,
            retry,
            actor_cpus,
            device,
        )
        for i, shard in enumerate(shards)
    ]
    seconds = {}
    clock = time.perf_counter()
    client = FederationClient(address, federation_id, site_id, credentials, retry=retry)
    results, later_sent, published = [], 0, 0  # later_sent: bytes of rounds 2 and 3

    def wait(*states: str) -> pb.StatusResponse:
        status = client.wait(wait_timeout, (*states, "FAILED"))
        if status.state not in states:
            raise RMMError(f"federation {federation_id} {status.state or 'did not finish'}: {status.message}")
        return status

    try:
        manifests = _get([h.manifest.remote() for h in handles])
        if calibration is not None:  # every task has its examples, before the site joins
            read_examples(calibration, [t for m in manifests for t in m["tasks"]])
        # The coordinator refuses a site whose canonicalisation differs from the federation's:
        # mixing canonical and raw factors would misalign positions across sites.
        if options.method == "auto":
            upload = "spectra"
        elif upload == "auto":
            upload, sketch_rank = _smallest_exact_upload(manifests)
        manifest = _site_manifest(manifests, upload, sketch_rank, options.canonicalize, calibration is not None)
        config = client.join(manifest)
        federation = MergeOptions(**config["merge"])
        if site_id not in client.status().committed_sites:  # else: restarted after its commit, it only waits
            on_stage(site_id, "upload")
            results = _get(
                [h.upload.remote(config["modules"], upload, sketch_rank, federation.canonicalize) for h in handles]
            )
            seconds["sketch_and_upload"] = time.perf_counter() - clock
            client.commit([pb.Part.FromString(part) for part, _ in results])
        on_stage(site_id, "wait")
        clock = time.perf_counter()
        if federation.method == "auto":  # a second round: every site's error curves against the joint bases
            status = wait("CURVES", "CALIBRATE", "DONE")
            if status.state == "CURVES" and not status.uploaded:
                on_stage(site_id, "curves")
                curves = _get([h.upload_curves.remote(config["modules"]) for h in handles])
                client.commit([pb.Part.FromString(part) for part, _ in curves])
                later_sent = sum(sent for _, sent in curves)
        if config.get("calibrate"):  # a third: each candidate plan's divergence, summed over the site's tasks
            status = wait("CALIBRATE", "DONE")
            if status.state == "CALIBRATE" and not status.uploaded:
                on_stage(site_id, "calibrate")
                start = time.perf_counter()
                sums = _get([h.calibrate.remote(calibration) for h in handles])
                seconds["calibrate"] = time.perf_counter() - start
                file = out / "work" / "divergences.safetensors"
                file.parent.mkdir(parents=True, exist_ok=True)
                write_divergences({name: sum(s[name] for s in sums) for name in sums[0]}, list(manifest.tasks), file)
                sent = client.traffic.bytes_sent
                client.commit([client.upload(file, "divergences")])
                later_sent += client.traffic.bytes_sent - sent
        status = wait("DONE")
        seconds["wait"] = time.perf_counter() - clock
        on_stage(site_id, "revert")
        finished = _get([h.finish.remote(federation, str(out)) for h in handles])
        if publish_coefficients:
            on_stage(site_id, "publish")
            uploads = _get([h.publish.remote(str(out)) for h in handles])
            client.publish([pb.PublishedTask.FromString(t) for tasks, _ in uploads for t in tasks])
            published = sum(sent for _, sent in uploads)
    finally:
        client.close()
        for h in handles:
            ray.kill(h)
    stats = [s for _, s in results]  # none when a restarted site had committed before
    return {
        "site": site_id,
        "tasks": [t for m in manifests for t in m["tasks"]],
        "actors": n,
        "device": device,
        "nodes": [m["node"] for m in manifests],  # each actor's Ray node id
        "upload": upload,
        "lora_bytes": sum(m["lora_bytes"] for m in manifests),
        "payload_bytes": sum(s["payload_bytes"] for s in stats),
        "payload_numbers": sum(s["payload_numbers"] for s in stats),
        "smallest_exact_numbers": sum(s["smallest_exact_numbers"] for s in stats),
        "bytes_up": sum(s["bytes_sent"] for s in stats) + later_sent,
        "chunks_skipped": sum(s["chunks_skipped"] for s in stats),
        "bytes_down": sum(f["bytes_received"] for f in finished),
        "bytes_published": published,
        "seconds": {
            **seconds,
            "sketch": max((s["sketch_seconds"] for s in stats), default=0.0),
            "upload": max((s["upload_seconds"] for s in stats), default=0.0),
            "download": max(f["download_seconds"] for f in finished),
            "revert": max(f["revert_seconds"] for f in finished),
        },
        "errors": {t: e for f in finished for t, e in f["errors"].items()},
        "reverted": str(out / "reverted"),
    }


def node_slots(resource: str, each: bool) -> list[str]:
    """Ids of the live nodes that hold `resource`, interleaved: once per unit of it with `each` (an actor per GPU),
    else once per node. Actor i placed on slot i mod len (`on_slot`) spreads actors over the nodes, which Ray's SPREAD
    does not do reliably for actors that reserve nothing."""
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource, 0) >= 1]
    counts = [int(n["Resources"][resource]) if each else 1 for n in nodes]
    return [n["NodeID"] for k in range(max(counts, default=0)) for n, c in zip(nodes, counts) if k < c]


def on_node(device: torch.device) -> None:
    """Check an actor's device where it runs, from its first call: a node that offers Ray a GPU its torch cannot use
    says so in one line (`_get` passes a call's RMMError on as itself; a failed __init__ reaches the driver as a
    traceback)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RMMError("a node of the Ray cluster offers a GPU, but torch there sees no CUDA GPU; use --device cpu")


def on_slot(slots: list[str], i: int):
    """Actor i's scheduling strategy: its slot's node. Not soft: Ray placed soft-pinned actors that reserve nothing
    by its own choice, often two on one node while others were free (a 3-node test cluster); an actor whose node is
    lost therefore fails the run (rerun the site: it resumes) instead of moving."""
    return NodeAffinitySchedulingStrategy(slots[i % len(slots)], soft=False) if slots else "DEFAULT"


def actor_device(name: str, gpus: int) -> str:
    """The device a site's actors compute on, "cpu" or "cuda", from --device and the cluster's GPU count."""
    if name not in DEVICES:
        raise RMMError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "cuda" and not gpus:
        raise RMMError("--device cuda asked for, but the Ray cluster has no GPU; use --device cpu or auto")
    return ("cuda" if gpus else "cpu") if name == "auto" else name


def ensure_ray(address: str | None = None) -> bool:
    """Join the shared Ray cluster at `address` (else $RAY_ADDRESS), as one more driver of it, or start an
    embedded local Ray sized for this machine; nothing if this process has one. True when it joined one.

    Every embedded Ray starts its own GCS, raylet and agents: on a loaded host, many site processes
    doing so at once can time out starting, hence the advice to share one.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return bool(address)
    quiet = {"log_to_driver": False, "configure_logging": False}
    # ray.init raises bare Exceptions (e.g. "The current node timed out during startup"): the first line says why.
    if address:
        host, _, port = address.rpartition(":")
        if (
            host and port.isdigit() and "://" not in host
        ):  # HOST:PORT (not auto, not ray://): Ray retries a dead one for minutes
            try:
                socket.create_connection((host, int(port)), timeout=10).close()
            except OSError as e:
                reason = e.strerror or e
                raise RMMError(
                    f"cannot join the Ray cluster at {address}: {reason}; is `ray start --head` running there?"
                ) from None
        try:
            ray.init(address=address, **quiet)
        except Exception as e:
            raise RMMError(f"cannot join the Ray cluster at {address}: {first_line(e)}") from None
        return True
    try:
        ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=256 * 1024 * 1024, include_dashboard=False, **quiet)
    except Exception as e:
        raise RMMError(
            f"could not start an embedded Ray ({first_line(e)}); for many sites on one host, start one shared Ray "
            "(`ray start --head --num-cpus N`) and give every site --ray-address auto"
        ) from None
    return False


def _get(refs: list) -> list:
    """ray.get, with an actor's RMMError (e.g. the coordinator's refusal) raised as itself: one line, no remote
    traceback; so is an actor Ray cannot place (its node gone, or lacking what it reserves)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, RMMError):
            raise e.cause from None
        raise
    except ray.exceptions.ActorUnschedulableError as e:
        raise RMMError(f"Ray cannot place an actor: {first_line(e)}") from None


def _smallest_exact_upload(manifests: list[dict]) -> tuple[str, int]:
    """The exact upload with the fewest numbers for this site: a full-rank sketch (r n per position)
    when it holds fewer than (r + 3) / 2 tasks, else moments (r (r + 3) / 2 per position)."""
    n = sum(len(m["tasks"]) for m in manifests)
    sketch = sum((m["out_features"] + m["in_features"]) * m["rank"] * n for m in manifests[0]["modules"])
    moments = sum(
        (m["out_features"] + m["in_features"]) * m["rank"] * (m["rank"] + 3) // 2 for m in manifests[0]["modules"]
    )
    return ("sketch", max(1, n - 1)) if sketch < moments else ("moments", 0)


def _site_manifest(
    manifests: list[dict], upload: str, sketch_rank: int, canonicalize: bool, calibration: bool = False
) -> pb.SiteManifest:
    """The site's manifest from its actors': every shard must hold the same base model and modules.

    Tasks and modules are sorted: the manifest is the same however the tasks are sharded over actors.
    """
    first = manifests[0]
    ranks = {m["name"]: m["rank"] for m in first["modules"]}
    for other in manifests[1:]:
        if other["base_model"] != first["base_model"] or sorted(m["name"] for m in other["modules"]) != sorted(ranks):
            raise RMMError("the site's adapter shards disagree on the base model or module set")
        for m in other["modules"]:
            ranks[m["name"]] = max(ranks[m["name"]], m["rank"])
    return pb.SiteManifest(
        base_model=first["base_model"],
        modules=[
            pb.Module(
                name=m["name"], out_features=m["out_features"], in_features=m["in_features"], rank=ranks[m["name"]]
            )
            for m in sorted(first["modules"], key=lambda m: m["name"])
        ],
        tasks=sorted(t for m in manifests for t in m["tasks"]),
        upload_kind=upload,
        sketch_rank=sketch_rank,
        lora_numbers=sum(m["lora_numbers"] for m in manifests),
        canonicalize=canonicalize,
        calibration=calibration,
        tool_version=__version__,
    )
