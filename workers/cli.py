"""`rmm site run` and `rmm simulate`, registered into the `rmm` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from functools import partial
from pathlib import Path

from rich.table import Table

from rmm.cli import (
    _print_summary,
    add_budget_args,
    add_calibration_args,
    add_device_arg,
    calibration_of,
    console,
    merge_options,
)
from rmm.errors import RMMError
from rmm.summary import inspect_bundle


def register(verbs) -> None:
    p = verbs.choices["merge"]
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="spread the modules over the Ray cluster at ADDR (auto: the one started on this host), one actor per "
        "node, or per GPU where the cluster has GPUs (--device auto uses them whatever this host has): curves there, "
        "the allocation here, solves there; every node must read the adapters at the same paths",
    )
    p.set_defaults(run=partial(_merge_on_cluster, p.get_default("run")))

    site = verbs.add_parser("site", help="take part in a federation as a site")
    site_verbs = site.add_subparsers(dest="site_verb", required=True, metavar="VERB")
    p = site_verbs.add_parser("run", help="join, upload sketches, wait for the basis, revert this site's tasks")
    _add_method_arg(p)
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    p.add_argument("--federation", required=True, metavar="ID")
    p.add_argument("--site", required=True, metavar="ID", help="this site's id in the federation config")
    p.add_argument(
        "--token-file", type=Path, metavar="FILE", help="file holding this site's bearer token (or set RMM_SITE_TOKEN)"
    )
    p.add_argument("--ca", type=Path, help="CA certificate that signed the coordinator's (PEM)")
    p.add_argument("--cert", type=Path, help="this site's client certificate, for mutual TLS (PEM)")
    p.add_argument("--key", type=Path, help="its private key (PEM)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC (loopback development only)")
    p.add_argument("--adapters", required=True, nargs="+", type=Path, metavar="DIR")
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join a shared Ray cluster, e.g. auto: the one `ray start --head` started on this host "
        "(default: $RAY_ADDRESS, else an embedded local Ray; many sites on one host must share one)",
    )
    p.add_argument("--actors", type=int, metavar="N", help="Ray actors holding shards (default: one per GPU, else 1)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads of each actor (default: 1 on a shared cluster, else this machine's CPUs over the actors)",
    )
    p.add_argument(
        "--retry-seconds",
        type=float,
        default=120.0,
        metavar="S",
        help="keep retrying a call for up to S seconds while the coordinator is unreachable, e.g. restarting "
        "(default 120)",
    )
    _add_upload_args(p)
    add_calibration_args(p)
    add_device_arg(p)
    p.add_argument(
        "--gpu-share",
        type=float,
        default=1.0,
        metavar="F",
        help="share of a GPU each actor reserves on CUDA (default 1; 0.25: four sites' actors share one GPU)",
    )
    p.add_argument("--canonicalize", action="store_true", help="canonicalise factors (must match the federation)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the site's report as JSON on stdout")
    p.set_defaults(run=_site_run)

    p = verbs.add_parser(
        "simulate", help="a whole federation on this machine: embedded Ray, loopback coordinator, N sites"
    )
    p.add_argument("--sites", type=int, default=3, metavar="N")
    p.add_argument("--adapters", required=True, nargs="+", type=Path, metavar="DIR")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    _add_method_arg(p)
    add_budget_args(p)
    _add_upload_args(p)
    add_calibration_args(p)
    add_device_arg(p)
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(run=_simulate)


def _add_method_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        choices=["auto", "rmm-paper"],
        help="auto (default; as rmm merge): the allocator, two rounds of uploads; rmm-paper: a per-position basis "
        "(implied, as in rmm merge, by a --basis-size or --canonicalize); must match the federation",
    )


def _add_upload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upload",
        choices=["moments", "sketch", "factors", "auto"],
        default="auto",
        help="what leaves the site under method rmm-paper (default auto: the smaller exact one of moments "
        "and a full-rank sketch); method auto always sends spectra, then curves",
    )
    p.add_argument("--sketch-rank", type=int, default=0, metavar="Q", help="rank q of a sketch upload")
    p.add_argument("--allow-factors", action="store_true", help="consent to sending raw adapters (--upload factors)")
    p.add_argument(
        "--publish-coefficients",
        action="store_true",
        help="once DONE, send the coordinator this site's (with simulate: every site's) coefficients, "
        "so it can revert the tasks itself",
    )


def _site_run(args) -> int:
    from protos.rmm.v1.wire import Retry
    from workers.client import Credentials
    from workers.site import ensure_ray, run_site

    options = merge_options(args)  # first: as merge, --canonicalize implies rmm-paper and contradicts --method auto
    calibration = calibration_of(args)
    token = os.environ.get("RMM_SITE_TOKEN") or (args.token_file.read_text().strip() if args.token_file else None)
    if not token:
        raise RMMError("no site token: pass --token-file FILE or set RMM_SITE_TOKEN")
    if not args.insecure and not args.ca:
        raise RMMError("TLS needs --ca (the coordinator's CA certificate); --insecure only for loopback development")
    credentials = Credentials(token=token, ca=args.ca, cert=args.cert, key=args.key, insecure=args.insecure)
    with _only_json_on_stdout(args.json):
        shared = ensure_ray(args.ray_address)
        # Threads x processes should stay near the cores: on a shared cluster, other sites' actors share them.
        threads = args.threads or (1 if shared else max(1, (os.cpu_count() or 1) // (args.actors or 1)))
        report = run_site(
            args.coordinator,
            args.federation,
            args.site,
            credentials,
            args.adapters,
            args.out,
            options=options,
            upload=args.upload,
            sketch_rank=args.sketch_rank,
            allow_factors=args.allow_factors,
            actors=args.actors,
            actor_cpus=threads,
            retry=Retry(seconds=args.retry_seconds),
            publish_coefficients=args.publish_coefficients,
            calibration=calibration,
            device=args.device,
            gpu_share=args.gpu_share,
            on_stage=_stage_printer(args.json),
        )
    _emit({"sites": [report]}, args.json)
    return 0


def _simulate(args) -> int:
    from workers.simulate import simulate

    if args.upload == "factors" and not args.allow_factors:
        raise RMMError("--upload factors sends raw adapters to the coordinator; add --allow-factors to opt in")
    with _only_json_on_stdout(args.json):
        report = simulate(
            args.adapters,
            args.sites,
            args.out,
            merge_options(args),
            upload=args.upload,
            sketch_rank=args.sketch_rank,
            force=args.force,
            publish_coefficients=args.publish_coefficients,
            calibration=calibration_of(args),
            device=args.device,
            on_stage=_stage_printer(args.json),
        )
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _emit(report, args.json)
    return 0


def _merge_on_cluster(local, args) -> int:
    """`rmm merge`, with --ray-address over the cluster's nodes (`workers.cluster`); the summary then says where each
    module was computed, per pass."""
    if args.ray_address is None:
        return local(args)
    from rmm.merge import merge
    from workers.cluster import ClusterMap
    from workers.site import ensure_ray

    options, calibration = merge_options(args), calibration_of(args)
    # The modules are computed on the cluster's device (--device against its nodes' GPUs); what the driver computes
    # itself (the allocation, calibration) on its own: a CPU head node with GPU workers is a usual cluster.
    with _only_json_on_stdout(args.json), ClusterMap(args.device) as spread:
        ensure_ray(args.ray_address)
        manifest = merge(
            args.adapters,
            args.out,
            options,
            calibration=calibration,
            device="cpu" if args.device == "cpu" else "auto",
            map_modules=spread,
            progress=not args.json,
            force=args.force,
        )
    summary = inspect_bundle(args.out, manifest) | {"cluster": spread.record()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
        where = summary["cluster"]
        console.print(
            f"modules computed on {where['nodes']} node(s) of the Ray cluster ({where['device']})", highlight=False
        )
    return 0


@contextlib.contextmanager
def _only_json_on_stdout(as_json: bool):
    """With --json, stdout carries the report alone. Ray prints its raylet's warnings on a driver's stdout
    ("(raylet) WARNING: ..."), from a thread, whatever log_to_driver says: until Ray is shut down,
    anything printed goes to stderr."""
    if not as_json:
        yield
        return
    import ray

    with contextlib.redirect_stdout(sys.stderr):
        try:
            yield
        finally:
            ray.shutdown()


def _stage_printer(quiet: bool):
    return (
        (lambda site, stage: None)
        if quiet
        else (lambda site, stage: console.print(f"[dim]{site}: {stage}[/]", highlight=False))
    )


def _emit(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    kinds = ", ".join(sorted({s["upload"] for s in report["sites"]}))
    table = Table(
        title=f"federation ({kinds} upload): traffic and seconds per site",
        caption="kB = 1000 bytes; LoRA: the site's adapters' LoRA tensors",
    )
    for col in ("site", "tasks", "LoRA kB", "up kB", "down kB", "sketch", "upload", "wait", "download", "revert"):
        table.add_column(col, justify="right", no_wrap=col == "site")
    for s in report["sites"]:
        t = s["seconds"]
        table.add_row(
            s["site"],
            str(len(s["tasks"])),
            *(f"{s[k] / 1000:,.0f}" for k in ("lora_bytes", "bytes_up", "bytes_down")),
            *(f"{t[k]:.2f}" for k in ("sketch", "upload", "wait", "download", "revert")),
        )
    console.print(table)
