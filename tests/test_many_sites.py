"""Many `rmm site run` processes on one host share one Ray cluster; `rmm simulate` keeps its inputs and its stdout
clean."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.many_sites import run
from rmm.errors import RMMError
from workers.simulate import simulate

RMM = str(Path(sys.executable).parent / "rmm")


def test_site_processes_share_one_ray_cluster_without_deadlock(tmp_path):
    """Four site processes, one Ray head with a single CPU: a site's actor holding a CPU while its
    site waits for the others would leave three of them unscheduled until the deadline."""
    result = run(4, tmp_path, cpus=1, timeout=150)
    assert result["max_relative_dW_difference_to_merge"] < 1e-5
    assert len(result["site_process_peak_rss_bytes"]) == 4 and min(result["site_process_peak_rss_bytes"]) > 0


def test_simulate_refuses_an_output_that_holds_or_lies_in_its_adapters(adapters, tmp_path):
    data = tmp_path / "D"
    inputs = [shutil.copytree(a, data / a.name) for a in adapters[:2]]
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data, inputs[0] / "sim"):
        with pytest.raises(RMMError, match="contain one another"):
            simulate(inputs, 2, out, force=True)
        assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_simulate_json_is_all_that_stdout_holds(adapters, tmp_path):
    """One CPU for four sites' actors makes the raylet warn, on the driver's stdout, that it started
    4x as many workers as it expected (max_io_workers=0: I/O workers are not counted against that);
    stdout must still parse as the report alone."""
    env = {**os.environ, "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 1}), "RAY_max_io_workers": "0"}
    args = [
        RMM,
        "simulate",
        "--sites",
        "4",
        "--adapters",
        *map(str, adapters[:4]),
        "--out",
        str(tmp_path / "sim"),
        "--json",
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert [len(s["tasks"]) for s in report["sites"]] == [1, 1, 1, 1]


def _lone_site(adapter, tmp_path) -> list[str]:
    """`rmm site run` for one adapter against a coordinator that is never reached (the test fails before)."""
    site = ["--coordinator", "127.0.0.1:1", "--federation", "f", "--site", "s", "--insecure"]
    return [RMM, "site", "run", *site, "--adapters", str(adapter), "--out", str(tmp_path / "out")]


def test_a_site_whose_embedded_ray_cannot_start_says_how_to_share_one(adapters, tmp_path):
    env = {**os.environ, "RAY_OVERRIDE_RESOURCES": "not json", "RMM_SITE_TOKEN": "t"}
    args = _lone_site(adapters[0], tmp_path)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "ray start --head" in last and "--ray-address" in last, done.stderr[-3000:]


def test_a_site_told_a_ray_address_where_nothing_listens_says_so_at_once(adapters, tmp_path):
    """Ray itself retries such an address for minutes before failing."""
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "RMM_SITE_TOKEN": "t"}
    args = [*_lone_site(adapters[0], tmp_path), "--ray-address", address]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: cannot join the Ray cluster at {address}"), (
        done.stderr[-3000:]
    )
