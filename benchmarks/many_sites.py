#!/usr/bin/env python
"""Many sites on one host: N `rmm site run` processes against one shared Ray cluster and one coordinator.

It starts one Ray head (`ray start --head --block` with its own temp dir and ports; stopped at the end by
ending that command, never by `ray stop`, which would stop every Ray on the machine) and one
`rmm coordinator serve` (plaintext on 127.0.0.1), then N site processes at once, each a Ray driver of
that cluster with `--tasks` PEFT adapters of its own. Every site's reverted adapters must equal
`rmm merge` + `rmm revert` of all the adapters. It reports the wall time (first site started to last
site done), the peak RSS of each site process and of each site's actor (a Ray worker process), and
how much the host's used memory grew.

    .venv/bin/python benchmarks/many_sites.py --sites 32     # writes benchmarks/results/many_sites.{json,md}
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source tree that was not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.merge_speed import GIB, MIB, Spec, machine_info, write_peft_adapters  # noqa: E402
from coordinator.config import CoordinatorConfig, FederationConfig, Site, token_hash  # noqa: E402
from rmm.adapter import open_adapters  # noqa: E402
from rmm.bundle import MergeOptions  # noqa: E402
from rmm.merge import merge, module_specs, revert  # noqa: E402
from workers.demo import _relative_difference  # noqa: E402

BIN = Path(sys.executable).parent  # the venv's bin: ray and rmm beside its python
FEDERATION = "many"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(temp_dir: Path, cpus: int, object_store_bytes: int, timeout: float = 120.0):
    """One Ray head for this run only: its own temp dir and ports (none of Ray's fixed defaults, so
    other clusters on the machine are untouched); yields (GCS address, the `ray start` process)."""
    port = free_port()
    services = (
        "ray-client-server",
        "dashboard-agent-listen",
        "dashboard-agent-grpc",
        "metrics-export",
        "runtime-env-agent",
    )
    ports = {k: free_port() for k in services}
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--num-cpus={cpus}",
        f"--object-store-memory={object_store_bytes}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        *(f"--{k}-port={v}" for k, v in ports.items()),
    ]
    head = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(head, "Ray runtime started", timeout)
        threading.Thread(target=head.stdout.read, daemon=True).start()  # keep draining its output
        yield f"127.0.0.1:{port}", head
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()


def _wait_for_line(proc: subprocess.Popen, marker: str, timeout: float) -> None:
    """Read proc's output until a line holds `marker`; a process still silent at `timeout` is killed."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                return
    finally:
        watchdog.cancel()
    raise RuntimeError(f"{shlex.join(proc.args[:3])} did not print {marker!r}:\n{''.join(lines[-20:])}")


@contextmanager
def coordinator(config_file: Path, port: int, log: Path, timeout: float = 60.0):
    """`rmm coordinator serve` in its own process, logging to `log`; ready once its port accepts connections."""
    with open(log, "w") as sink:
        proc = subprocess.Popen([str(BIN / "rmm"), "coordinator", "serve", "--config", str(config_file)], stderr=sink)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"coordinator did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


class PeakRSS:
    """Samples, every `period` seconds in a thread, the RSS of given processes and of the Ray workers
    running a site's actor (`ray::SiteShard`) under the head, and the host's used memory; keeps the peaks.

    RSS counts the pages a process shares with others (Python, torch and Ray's libraries), so the host's
    used memory, above what it was when sampling began, is what the sites really cost (other programs
    on the host included)."""

    def __init__(self, sites: dict[str, subprocess.Popen], head: subprocess.Popen, period: float = 0.5):
        self.sites, self.head, self.period = sites, psutil.Process(head.pid), period
        self.site_peak: dict[str, int] = {}
        self.actor_peak: dict[int, int] = {}
        self.cluster_peak = 0  # the head's whole process tree: GCS, raylet, agents, every actor
        self.host_baseline = self.host_peak = psutil.virtual_memory().used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.host_peak = max(self.host_peak, psutil.virtual_memory().used)
            for name, proc in list(self.sites.items()):  # the dict fills while sites are started
                self.site_peak[name] = max(self.site_peak.get(name, 0), _rss(proc.pid))
            tree = self.head.children(recursive=True)
            self.cluster_peak = max(self.cluster_peak, sum(_rss(p.pid) for p in tree))
            for p in tree:
                try:
                    if p.cmdline()[:1] == ["ray::SiteShard"]:
                        self.actor_peak[p.pid] = max(self.actor_peak.get(p.pid, 0), _rss(p.pid))
                except psutil.Error:
                    pass


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:  # it exited between the listing and the read
        return 0


def run(sites: int, work: Path, *, tasks: int = 1, cpus: int = 2, threads: int = 1, timeout: float = 600.0) -> dict:
    """The whole load test under `work`; raises if any site fails or differs from the central merge."""
    work.mkdir(parents=True, exist_ok=True)
    spec = Spec(
        kind="peft",
        layers=2,
        hidden=64,
        tasks=sites * tasks,
        rank=4,
        lora_alpha=8,
        dtype="float32",
        shared_rank=2,
        seed=0,
    )
    dirs, _ = write_peft_adapters(spec, work / "adapters", log=lambda *_: None)
    options = MergeOptions(storage_ratio=0.5)  # the default method, auto
    central = work / "central"
    merge(dirs, central / "bundle", options, progress=False, force=True)
    revert(central / "bundle", central / "reverted", progress=False, force=True)

    names = [f"s{i:02d}" for i in range(sites)]
    tokens = {n: f"token-{n}-{os.getpid()}" for n in names}
    adapters = open_adapters(dirs)
    port = free_port()
    federation = FederationConfig(
        id=FEDERATION,
        base_model=adapters[0].base_model or "",
        modules=module_specs(adapters),
        merge=options,
        sites={n: Site(token_sha256=token_hash(t)) for n, t in tokens.items()},
        min_sites=sites,
        deadline_seconds=timeout,
    )
    config = CoordinatorConfig(port=port, state_dir=work / "state", insecure=True, federations=[federation])
    (work / "coordinator.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))

    # Ray's sockets live under its temp dir, whose path must stay short (AF_UNIX allows 107 bytes).
    procs: dict[str, subprocess.Popen] = {}
    with (
        tempfile.TemporaryDirectory(prefix="rmm-ray-") as ray_tmp,
        ray_head(Path(ray_tmp), cpus, 128 * MIB) as (ray_address, head),
    ):
        with coordinator(work / "coordinator.yaml", port, work / "coordinator.log"), PeakRSS(procs, head) as memory:
            clock = time.perf_counter()
            for i, name in enumerate(names):
                site = [
                    "--site",
                    name,
                    "--adapters",
                    *map(str, dirs[i * tasks : (i + 1) * tasks]),
                    "--out",
                    str(work / name),
                ]
                common = [
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--federation",
                    FEDERATION,
                    "--insecure",
                    "--ray-address",
                    ray_address,
                ]
                procs[name] = _start_site(
                    [*site, *common, "--threads", str(threads), "--json"], tokens[name], work / name
                )
            codes = _finish(procs, clock + timeout)
            seconds = time.perf_counter() - clock
    failed = {n: (work / f"{n}.log").read_text()[-2000:] for n, rc in codes.items() if rc != 0}
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {sites} sites failed: "
            + "\n".join(f"{n} (exit {codes[n]}): {e}" for n, e in failed.items())
        )
    worst = 0.0
    for name in names:
        for task in json.loads((work / f"{name}.json").read_text())["sites"][0]["tasks"]:
            worst = max(worst, _relative_difference(work / name / "reverted" / task, central / "reverted" / task))
    site_rss, actor_rss = sorted(memory.site_peak.values()), sorted(memory.actor_peak.values())
    return {
        "sites": sites,
        "tasks_per_site": tasks,
        "ray_cpus": cpus,
        "threads_per_actor": threads,
        "adapter": {"layers": spec.layers, "hidden": spec.hidden, "rank": spec.rank, "modules": len(spec.modules)},
        "wall_seconds": seconds,
        "max_relative_dW_difference_to_merge": worst,
        "site_process_peak_rss_bytes": site_rss,
        "actor_process_peak_rss_bytes": actor_rss,
        "ray_cluster_peak_rss_bytes": memory.cluster_peak,
        "host_used_memory_peak_increase_bytes": memory.host_peak - memory.host_baseline,
    }


def _start_site(args: list[str], token: str, files: Path) -> subprocess.Popen:
    """`rmm site run ARGS`, its report (stdout) in FILES.json, its log in FILES.log: a full pipe would stall it."""
    with open(files.with_suffix(".json"), "w") as out, open(files.with_suffix(".log"), "w") as err:
        env = {**os.environ, "RMM_SITE_TOKEN": token}
        return subprocess.Popen([str(BIN / "rmm"), "site", "run", *args], env=env, stdout=out, stderr=err)


def _finish(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int]:
    """Every site's exit code; a site still running at the deadline is killed (exit -9)."""
    for proc in procs.values():
        try:
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {name: proc.returncode for name, proc in procs.items()}


def render(result: dict, command: str) -> str:
    site, actor = result["site_process_peak_rss_bytes"], result["actor_process_peak_rss_bytes"]
    host = result["host_used_memory_peak_increase_bytes"]

    def spread(xs: list[int]) -> str:
        return f"{xs[len(xs) // 2] / MIB:.0f} MiB (max {xs[-1] / MIB:.0f})" if xs else "n/a"

    return "\n".join(
        [
            f"`{command}`",
            "",
            "| sites | tasks / site | Ray CPUs | wall time | site process peak RSS, median (max) "
            "| its actor's peak RSS, median (max) "
            "| Ray cluster peak RSS (all actors included) | host memory used: peak increase (per site) "
            "| max rel. dW difference to `rmm merge` |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {result['sites']} | {result['tasks_per_site']} | {result['ray_cpus']} | {result['wall_seconds']:.1f} "
            f"s | {spread(site)} "
            f"| {spread(actor)} | {result['ray_cluster_peak_rss_bytes'] / GIB:.2f} GiB "
            f"| {host / GIB:.2f} GiB ({host / result['sites'] / MIB:.0f} MiB) | "
            f"{result['max_relative_dW_difference_to_merge']:.1e} |",
            "",
            "RSS counts shared pages (the Python, torch and Ray libraries) in every process, so sums of it "
            "overstate the host's memory;",
            "the host's used memory is measured from just before the sites start (other programs on the host "
            "included).",
            "",
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=32)
    p.add_argument("--tasks", type=int, default=1, help="adapters per site")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="--num-cpus of the shared Ray head")
    p.add_argument("--threads", type=int, default=1, help="torch threads per site actor")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    command = shlex.join(["benchmarks/many_sites.py", *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="rmm-many-sites-") as work:
        result = run(
            args.sites, Path(work), tasks=args.tasks, cpus=args.cpus, threads=args.threads, timeout=args.timeout
        )
    result |= {"command": command, "machine": machine_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "many_sites.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render(result, command)
    (args.out / "many_sites.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
