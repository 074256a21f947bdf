"""`rmm coordinator serve` and `rmm certs`, registered into the `rmm` command."""

from __future__ import annotations

from pathlib import Path

from rmm.cli import console


def register(verbs) -> None:
    p = verbs.add_parser("coordinator", help="run a federation coordinator")
    sub = p.add_subparsers(dest="coordinator_verb", required=True, metavar="VERB")
    s = sub.add_parser("serve", help="serve the federations of a config file over gRPC")
    s.add_argument("--config", required=True, type=Path, metavar="FED.yaml")
    s.add_argument("--state-dir", type=Path, metavar="DIR", help="overrides state_dir in the config")
    s.add_argument("--port", type=int, help="overrides port in the config")
    s.set_defaults(run=_serve)

    c = verbs.add_parser(
        "certs", help="make a development CA, a server certificate and one client certificate per site"
    )
    c.add_argument("--out", required=True, type=Path, metavar="DIR")
    c.add_argument("--sites", required=True, nargs="+", metavar="ID")
    c.add_argument(
        "--hosts",
        nargs="+",
        default=["localhost", "127.0.0.1"],
        help="names and IPs the server certificate is valid for",
    )
    c.set_defaults(run=_certs)


def _serve(args) -> int:
    from coordinator.config import load_config
    from coordinator.server import run

    config = load_config(args.config)
    updates = {k: v for k, v in (("state_dir", args.state_dir), ("port", args.port)) if v is not None}
    run(config.model_copy(update=updates))
    return 0


def _certs(args) -> int:
    from coordinator.certs import make_dev_certs

    paths = make_dev_certs(args.out, args.sites, tuple(args.hosts))
    for name, path in paths.items():
        console.print(f"{name}: {path}", highlight=False)
    return 0
