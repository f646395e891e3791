"""`extproc` command line: serve, run the local stack, check a policy, render Envoy's bootstrap.

Every command that reads a policy file reports problems the same way, one
`FILE: key: reason` line each on stderr and exit status 1, so CI and humans read the
same output.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from extproc.config import MAX_WORKERS, Config, ConfigError, check_workers, load_config
from extproc.netaddr import split_host_port

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return None


def _exit_code(result: object) -> int:
    return result if isinstance(result, int) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    workers = args.workers or config.server.workers
    problems = check_workers(config, workers)
    if problems:
        for line in ConfigError(args.config, problems).lines():
            print(line, file=sys.stderr)
        return 1
    if workers > 1:
        from extproc import supervisor  # spawns the workers; never imports grpc itself

        if workers != config.server.workers:
            print(
                f"note: --workers {workers}, but the Envoy bootstrap rendered from "
                f"{args.config} lists server.workers={config.server.workers} endpoint(s); "
                "set server.workers so Envoy spreads streams over every worker",
                file=sys.stderr,
            )
        return _exit_code(supervisor.main(config, workers))
    from extproc import server  # lazy: grpc start-up cost only for `serve`

    return _exit_code(server.main(config))


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be 1-{MAX_WORKERS}, got {value}")
    return value


def _listen(text: str) -> str:
    try:
        split_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected ip:port (e.g. 127.0.0.1:8081): {exc}") from None
    return text


def default_run_config() -> str:
    """The real OpenAI when a key is at hand, else the offline mock."""
    name = "openai.yaml" if os.environ.get("OPENAI_API_KEY") else "dev.yaml"
    return str(CONFIG_DIR / name)


def cmd_run(args: argparse.Namespace) -> int:
    if args.config is None:
        args.config = default_run_config()
    if _load(args.config) is None:
        return 1
    from extproc.dev import devstack  # lazy: `serve` never loads the dev stack

    return _exit_code(devstack.main(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.schema:
        import json

        from extproc.config import schema

        print(json.dumps(schema(), indent=2))
        return 0
    if args.file is None:
        print("check-config: give a FILE, or --schema", file=sys.stderr)
        return 2
    if _load(args.file) is None:
        return 1
    print(f"{args.file}: OK")
    return 0


def cmd_envoy_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return 1
    from extproc.bootstrap import BootstrapError, bootstrap_yaml

    try:
        text = bootstrap_yaml(config, source=args.file)
    except BootstrapError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            print(f"{args.output}: cannot write: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 0


def cmd_spend(args: argparse.Namespace) -> int:
    from extproc.spend import report  # lazy: only this command reads the ledger

    return report.main(args.by, args.since, args.format, args.ledger)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc", description="Envoy ext_proc sidecar that makes Envoy an AI gateway."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the ext_proc gRPC server")
    serve.add_argument("--config", required=True, metavar="FILE", help="policy YAML file")
    serve.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N",
        help="worker processes, each on its own port or socket (default: server.workers)",
    )
    serve.set_defaults(handler=cmd_serve)

    run = commands.add_parser("run", help="run Envoy, the sidecar and the mock provider locally")
    run.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="policy YAML file (default: config/openai.yaml if OPENAI_API_KEY is set, "
        "else config/dev.yaml)",
    )
    run.add_argument(
        "--workdir", metavar="DIR", default=None, help="where logs and the bootstrap go"
    )
    run.add_argument(
        "--listen",
        type=_listen,
        default=None,
        metavar="HOST:PORT",
        help="Envoy's listener instead of envoy.listen (e.g. a second stack beside the first)",
    )
    run.add_argument(
        "--mock-delay-ms",
        type=float,
        default=30.0,
        metavar="MS",
        help="delay between the mock provider's stream chunks (default 30, like a real model)",
    )
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser("check-config", help="validate a policy file and exit")
    check.add_argument("file", metavar="FILE", nargs="?")
    check.add_argument(
        "--schema", action="store_true", help="print the policy file's JSON Schema instead"
    )
    check.set_defaults(handler=cmd_check_config)

    envoy = commands.add_parser("envoy-config", help="print the Envoy bootstrap for a policy")
    envoy.add_argument("file", metavar="FILE")
    envoy.add_argument("-o", "--output", metavar="OUT", help="write to OUT instead of stdout")
    envoy.set_defaults(handler=cmd_envoy_config)

    spend = commands.add_parser("spend", help="who spent what, from the spend ledger")
    spend.add_argument(
        "--by", choices=("consumer", "team", "model", "route", "provider"), default="consumer"
    )
    spend.add_argument(
        "--since", default="7d", metavar="WHEN", help="7d, 24h, 30m or an ISO date (default 7d)"
    )
    spend.add_argument("--format", choices=("table", "csv", "json"), default="table")
    spend.add_argument(
        "--ledger",
        default="sqlite:///data/ledger.sqlite3",
        metavar="URL",
        help="sqlite:///PATH or postgresql://... (default sqlite:///data/ledger.sqlite3)",
    )
    spend.set_defaults(handler=cmd_spend)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
