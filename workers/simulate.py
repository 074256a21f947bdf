"""`rmm simulate`: a whole federation on one machine, through the deployment code path.

One embedded local Ray (or the cluster at $RAY_ADDRESS), a coordinator on 127.0.0.1 (mutual TLS
with throwaway development certificates, per-site tokens), and N sites, each a `run_site` with its
own Ray actors, running concurrently. Nothing is mocked: the sites reach the coordinator over real gRPC.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from coordinator.certs import make_dev_certs
from coordinator.config import CoordinatorConfig, FederationConfig, Site, TLSConfig, token_hash
from coordinator.server import Coordinator
from rmm.adapter import open_adapters
from rmm.bundle import MergeOptions
from rmm.calibrate import Calibration
from rmm.errors import RMMError
from rmm.io import check_output
from rmm.plan import module_specs
from workers.client import Credentials, FederationClient
from workers.site import ensure_ray, run_site

FEDERATION = "simulation"


class BackgroundCoordinator:
    """A Coordinator serving from its own event loop in a daemon thread (for simulations and tests)."""

    def __init__(self, config: CoordinatorConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="coordinator", daemon=True)
        self.thread.start()
        self.coordinator = Coordinator(config)
        try:
            self.port = self._run(self.coordinator.start())
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self._run(self.coordinator.stop(1.0))
        self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def split(items: list, parts: int) -> list[list]:
    """Contiguous shards whose sizes differ by at most one (uneven when parts does not divide)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def simulate(
    adapter_dirs: list[str | Path],
    sites: int,
    out: str | Path,
    options: MergeOptions | None = None,
    *,
    upload: str = "auto",
    sketch_rank: int = 0,
    shards: list[list[str | Path]] | None = None,
    force: bool = False,
    publish_coefficients: bool = False,
    calibration: Calibration | None = None,
    device: str = "auto",
    on_stage=lambda site, stage: None,
) -> dict:
    """Run a federation of `sites` sites over `adapter_dirs` (or explicit `shards`); returns the report.

    Everything (certificates, coordinator state, each site's outputs) goes under `out`, which must be
    new or empty unless `force` replaces it. With `publish_coefficients` every site publishes its
    tasks' coefficients, so `out/coordinator/<federation>/result/` is a bundle of all of them. With `calibration`
    the federation calibrates (method auto), every site measuring its own tasks on the same base and examples
    directory, as `rmm merge --calibration` does centrally. `device`: where the sites' actors compute (`run_site`).
    """
    options = options or MergeOptions()
    if options.method == "auto" and upload not in ("auto", "spectra"):
        raise RMMError(f"method auto uploads spectra; --upload {upload} is for method rmm-paper")
    out = Path(out)
    check_output(out, force, inputs=[*adapter_dirs, *(d for shard in shards or [] for d in shard)])
    shutil.rmtree(out, ignore_errors=True)
    adapters = open_adapters(adapter_dirs)
    shards = shards or split([a.path for a in adapters], sites)
    if any(not s for s in shards):
        raise ValueError(f"{len(adapters)} adapters cannot fill {len(shards)} sites")
    names = [f"site{i}" for i in range(len(shards))]
    tokens = {n: secrets.token_urlsafe(24) for n in names}
    certs = make_dev_certs(out / "certs", names)
    federation = FederationConfig(
        id=FEDERATION,
        base_model=adapters[0].base_model or "",
        modules=module_specs(adapters),
        merge=options,
        sites={n: Site(token_sha256=token_hash(t)) for n, t in tokens.items()},
        min_sites=len(names),
        upload_kinds=None if options.method == "auto" or upload == "auto" else [upload],
        calibrate=calibration is not None,
    )
    config = CoordinatorConfig(
        port=0,
        state_dir=out / "coordinator",
        tls=TLSConfig(cert=certs["server_cert"], key=certs["server_key"], client_ca=certs["ca_cert"]),
        federations=[federation],
    )
    ensure_ray()
    coordinator = BackgroundCoordinator(config)
    address = f"127.0.0.1:{coordinator.port}"
    cpus, gpus = ray.cluster_resources().get("CPU", 1), ray.cluster_resources().get("GPU", 0)

    def credentials(name: str) -> Credentials:
        return Credentials(
            token=tokens[name], ca=certs["ca_cert"], cert=certs[f"{name}_cert"], key=certs[f"{name}_key"]
        )

    def site(i: int) -> dict:
        name = names[i]
        return run_site(
            address,
            FEDERATION,
            name,
            credentials(name),
            shards[i],
            out / name,
            options=options,
            upload=upload,
            sketch_rank=sketch_rank,
            allow_factors=upload == "factors",
            actor_cpus=cpus / len(names),
            wait_timeout=600,
            publish_coefficients=publish_coefficients,
            calibration=calibration,
            device=device,
            gpu_share=min(1.0, gpus / len(names)) or 1.0,  # every site at once: they share the GPUs
            on_stage=on_stage,
        )

    clock = time.perf_counter()
    try:
        with ThreadPoolExecutor(len(names)) as pool:
            results = list(pool.map(site, range(len(names))))
        client = FederationClient(address, FEDERATION, names[0], credentials(names[0]))
        report = client.report()
        client.close()
    finally:
        coordinator.stop()
    return {"seconds": time.perf_counter() - clock, "address": address, "sites": results, "coordinator": report}
