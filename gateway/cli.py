"""The ``gateway`` command (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from gateway import __version__
from gateway.commands import (
    add_options,
    audit,
    config_option,
    emit,
    identity,
    incident,
    json_alias,
    load,
    models,
    workers,
)

__all__ = ["main"]


def _cmd_init(args: argparse.Namespace) -> int:
    from gateway.devsetup import init

    report = init(Path(args.dir), Path(args.models), port=args.port, force=args.force)
    for path in report.created:
        print(f"created  {path}")
    for path in report.kept:
        print(f"kept     {path} (use --force to replace)")
    print(f"\nNext: gateway serve --config {Path(args.dir) / 'gateway.toml'}")
    return 0


MODERN_OPENSSL_CONF = Path(__file__).parent / "server" / "openssl-modern.cnf"


def _modern_tls_groups() -> None:
    """Key exchange over X25519, P-256 and P-384 only, in this process and the serving processes it
    starts: OpenSSL reads its configuration once, when the ``ssl`` module is first imported, so it
    is set before that (or the command runs again with it). An ``OPENSSL_CONF`` of the
    environment's own is left as it is."""
    if os.environ.get("OPENSSL_CONF"):
        return
    os.environ["OPENSSL_CONF"] = str(MODERN_OPENSSL_CONF)
    if "ssl" in sys.modules:  # too late for this interpreter: start again with it
        os.execv(sys.executable, [sys.executable, "-m", "gateway", *sys.argv[1:]])


ORT_MISSING = ("ONNX Runtime is not installed: install the gateway with `pip install 'gateway[gpu]'` "
               "(onnxruntime-gpu: CUDA, with a CPU fallback) or `pip install 'gateway[cpu]'` (onnxruntime)")


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        print(f"gateway: {ORT_MISSING}", file=sys.stderr)
        return 2
    if os.environ.get("GATEWAY_REQUIRE_CUDA") == "1":  # the cuda image: no silent CPU fallback
        from gateway.workers.session import cuda_problem

        if problem := cuda_problem():
            print(f"gateway: GATEWAY_REQUIRE_CUDA=1 but {problem}", file=sys.stderr)
            return 2
    _modern_tls_groups()
    if os.geteuid() != 0:
        from gateway.workers.isolation import drop_capabilities

        drop_capabilities()
    from gateway.config import ConfigError
    from gateway.registry.manifest import ManifestError
    from gateway.server import serve
    from gateway.workers.supervisor import WorkerStartError

    try:
        return serve(args.config)
    except (ConfigError, ManifestError, WorkerStartError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = load(args)  # a ConfigError is reported by main, exit 2
    warnings = config.insecure_settings()
    print(f"{args.config}: valid; {len(config.models)} model(s)")
    for w in warnings:
        print(f"insecure: {w}")
    return 1 if warnings and args.strict else 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from gateway.doctor import as_json, diagnose, exit_code

    config = load(args)
    client_cert = None
    if args.url and Path(args.credentials).is_file():  # the running gateway asks for a client certificate
        creds = json.loads(Path(args.credentials).read_text())["principals"].get(args.principal, {})
        client_cert = (creds["cert"], creds["key"]) if "cert" in creds else None
        args.ca = args.ca or json.loads(Path(args.credentials).read_text()).get("ca", "")
    findings = diagnose(config, args.url, args.ca, client_cert)
    if args.format == "json":
        print(as_json(findings))
    elif args.format == "yaml":
        emit(json.loads(as_json(findings)), "yaml")
    else:
        for f in findings:
            print(f"{f.severity:8s} {f.id}: {f.what}\n         fix: {f.fix}")
        print(f"{len(findings)} finding(s)" + (f" ({args.url} checked too)" if args.url else
                                                " (configuration and files; --url checks a running gateway too)"))
    return exit_code(findings, args.strict)


class Parser(argparse.ArgumentParser):
    """argparse, with "did you mean" for a mistyped command, action or choice."""

    def error(self, message: str) -> NoReturn:
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            hint = difflib.get_close_matches(match.group(1), choices, 1)
            if hint:
                message += f"; did you mean {hint[0]!r}?"
        super().error(message)


def _global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--log-level`` and ``--debug`` on the command line's every level, before or after the rest
    (below the top, an option not given leaves the top's default in place)."""
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default="info" if top else argparse.SUPPRESS,
                        help="how much to log (default info; debug shows library logs too)")
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the traceback of an unexpected error")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _global_options(child, top=False)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gateway", description="Secure model-serving gateway.",
                    epilog="exit codes: 0 ok, 1 failure, 2 usage or configuration, 3 not found, 4 refused by the gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    p = sub.add_parser("init", help="write a development PKI, configuration and credentials")
    p.add_argument("--dir", default=".", help="where to write certs/, gateway.toml, credentials.json")
    p.add_argument("--models", default="models", help="model repository the configuration points at")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--force", action="store_true", help="replace existing keys, certificates and config")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("serve", help="start the workers and serve HTTPS")
    config_option(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check", help="validate a configuration and list its insecure settings")
    config_option(p)
    p.add_argument("--strict", action="store_true", help="exit 1 if any setting weakens security")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("doctor", help="self-audit a configuration, its files and (--url) a running gateway")
    config_option(p)
    p.add_argument("--url", default="", help="a running gateway to check too (readiness, TLS groups)")
    p.add_argument("--ca", default="", help="the CA of its server certificate (default: tls.client_ca_file)")
    p.add_argument("--credentials", default="credentials.json", help="--url: the client certificate to reach it with")
    p.add_argument("--principal", default="admin", help="--url: whose certificate in the credentials file")
    p.add_argument("-o", "--format", default="table", choices=["table", "json", "yaml"],
                   help="print the findings as text (default), JSON or YAML")
    add_options(p, [json_alias()])
    p.add_argument("--strict", action="store_true", help="exit 1 on any finding above info (default: critical, high)")
    p.set_defaults(func=_cmd_doctor)

    for module in (identity, audit, models, incident, workers):
        module.add_parsers(sub)
    _global_options(parser, top=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":  # a client library's request lines are noise on a command's output
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from gateway.config import ConfigError

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 1
    except Exception as exc:  # a mistake of ours or of the environment: one line, unless --debug
        if args.debug:
            raise
        print(f"gateway: unexpected error: {type(exc).__name__}: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 1
