"""A coordinator killed (SIGKILL) and restarted at the worst moments loses no site and no acknowledged chunk.

The coordinator runs as its own process (`rmm coordinator serve`); two sites run `run_site` over
real Ray actors with real PEFT adapters on wide Linear layers, so each site's first upload spans
several 4 MiB chunks. The coordinator is killed during that upload, while the sites wait for the
first round to close, and during the second round (curves), and restarted on the same port and
state directory each time. Every site must finish with the central `rmm merge`'s adapters, having
sent each chunk's bytes once.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from torch import nn

from coordinator.config import FederationConfig, Site, token_hash
from protos.rmm.v1.wire import MAX_CHUNK
from rmm.adapter import open_adapters
from rmm.bundle import MergeOptions
from rmm.merge import merge, module_specs, revert
from test_federation import _assert_same_adapters
from workers.client import Credentials
from workers.site import run_site

WIDTH, LAYERS, RANK = 2048, 6, 16  # a site's spectra of two tasks: 12 MiB, three 4 MiB chunks
OPTIONS = MergeOptions(storage_ratio=0.5)
RMM = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "rmm"


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))


@pytest.fixture(scope="module")
def wide_adapters(tmp_path_factory) -> list[Path]:
    """Four PEFT adapters of rank 16 on six 2048x2048 layers, saved by PEFT."""
    root = tmp_path_factory.mktemp("wide")
    paths = []
    for task in range(4):
        torch.manual_seed(0)
        model = get_peft_model(
            Wide(), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[f"layers.{i}" for i in range(LAYERS)])
        )
        gen = torch.Generator().manual_seed(100 + task)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        model.save_pretrained(root / f"wide{task}")
        paths.append(root / f"wide{task}")
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CoordinatorProcess:
    """`rmm coordinator serve` in its own process, killed with SIGKILL and restarted on the same port and state."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log, self.starts = config, log, 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [str(RMM), "coordinator", "serve", "--config", str(self.config)], stderr=log, stdout=log
            )

    def kill_and_restart(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _first(pattern: str | tuple[str, ...], root: Path, timeout: float) -> Path:
    """The first file matching `pattern` (or any of several) under `root` (polled), or fail."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        patterns = (pattern,) if isinstance(pattern, str) else pattern
        found = [p for pat in patterns for p in root.glob(pat) if not p.name.startswith(".")]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no {pattern} under {root} after {timeout} s")


def test_sigkilled_coordinator_loses_no_site_and_no_acknowledged_chunk(ray_cluster, wide_adapters, tmp_path):
    central = tmp_path / "central"
    merge(wide_adapters, central / "bundle", OPTIONS, progress=False)
    revert(central / "bundle", central / "reverted", progress=False)

    tokens = {"a": "token-a", "b": "token-b"}
    shards = {"a": wide_adapters[:2], "b": wide_adapters[2:]}
    opened = open_adapters(wide_adapters)
    federation = FederationConfig(
        id="fed",
        base_model=opened[0].base_model or "",
        modules=module_specs(opened),
        merge=OPTIONS,
        sites={s: Site(token_sha256=token_hash(t)) for s, t in tokens.items()},
        min_sites=2,
        deadline_seconds=600,
    )
    port = _free_port()
    state = tmp_path / "state"
    config = {
        "port": port,
        "state_dir": str(state),
        "insecure": True,
        "federations": [federation.model_dump(mode="json")],
    }
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(config))
    coordinator = CoordinatorProcess(tmp_path / "fed.yaml", tmp_path / "coordinator.log")
    sites = state / "fed" / "sites"
    kills = []

    def killer():
        # (a) during the first upload: its first chunk is on disk, more are coming.
        kills.append(_first("*/chunks/*", sites, 120))
        coordinator.kill_and_restart()
        # (c) while sites wait: a site has committed and waits for the round to close.
        kills.append(_first("*/commit.json", sites, 120))
        coordinator.kill_and_restart()
        # (b) during the second round: the bases are out and a site's curves are arriving, or one site's have
        # landed and the other's are due (a one-chunk upload can land between two polls).
        _first("bases.json", state / "fed" / "bases", 120)
        kills.append(_first(("*/chunks/*", "*/curves/commit.json"), sites, 120))
        coordinator.kill_and_restart()

    def site(name: str) -> dict:
        return run_site(
            f"127.0.0.1:{port}",
            "fed",
            name,
            Credentials(token=tokens[name], insecure=True),
            shards[name],
            tmp_path / name,
            actors=1,
            wait_timeout=120,
        )

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            reports = dict(zip(shards, pool.map(site, shards)))
    finally:
        thread.join(5)
        coordinator.stop()
    assert len(kills) == 3 and coordinator.starts == 4, (kills, (tmp_path / "coordinator.log").read_text()[-3000:])
    for name, report in reports.items():
        _assert_same_adapters(tmp_path / name / "reverted", central / "reverted", report["tasks"])
        work = tmp_path / name / "work" / "0"
        spectra, curves = (work / f"{name}-0.{kind}.safetensors" for kind in ("payload", "curves"))
        assert spectra.stat().st_size > 2 * MAX_CHUNK
        # Each chunk's bytes were acknowledged once: nothing acknowledged was sent again after a restart.
        assert report["bytes_up"] == spectra.stat().st_size + curves.stat().st_size, name
