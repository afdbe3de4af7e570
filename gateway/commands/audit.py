"""``gateway audit verify | tail | export``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from gateway.commands import add_area, config_opt, load, opt

__all__ = ["add_parsers"]


def _cmd_audit(args: argparse.Namespace) -> int:
    from gateway.audit.chain import load_public_key, verify_paths

    if args.action == "verify":
        key_path = args.public_key or load(args).audit.public_key
        paths = args.paths or [load(args).audit.directory]
        report = verify_paths(paths, load_public_key(key_path), allow_unsealed=args.allow_unsealed,
                              manifest=Path(args.manifest) if args.manifest else None,
                              require_manifest=not args.no_manifest)
        for note in report.notes:
            print(f"note: {note}")
        for problem in report.problems:
            print(f"FAIL: {problem}")
        verdict = "verified" if report.ok else "NOT verified"
        print(f"{verdict}: {report.records} records, {report.checkpoints} signed checkpoints, "
              f"streams {', '.join(report.streams) or '-'}")
        return 0 if report.ok else 1
    return _audit_read(args)


def _audit_read(args: argparse.Namespace) -> int:
    """``tail`` and ``export``: records as JSON lines, filtered; ``tail -f`` follows new ones."""
    import orjson

    from gateway.audit.chain import stream_files

    paths = args.paths or [load(args).audit.directory]
    files = [f for fs in stream_files(paths).values() for f in fs]

    def keep(record: dict[str, object]) -> bool:
        when = str(record.get("time", ""))
        principal = record.get("principal")
        subject = principal.get("subject") if isinstance(principal, dict) else None
        return ((not args.since or when >= args.since) and (not args.until or when < args.until)
                and (not args.principal or subject == args.principal)
                and (not args.model or record.get("model") == args.model)
                and (not args.outcome or record.get("outcome") == args.outcome)
                and (not args.kind or record.get("kind") == args.kind))

    found: list[tuple[str, bytes]] = []
    for f in files:
        for line in f.read_bytes().splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn last line
            if keep(record):
                found.append((str(record.get("time", "")), line))
    records = [line for _, line in sorted(found, key=lambda item: item[0])]  # every stream, in time order
    if args.action == "tail":
        records = records[-args.lines:]
    sys.stdout.write("".join(r.decode() + "\n" for r in records))
    sys.stdout.flush()
    if args.action == "tail" and args.follow:
        return _follow(files[-1] if files else None, keep)
    return 0


def _follow(path: Path | None, keep: Any) -> int:
    import orjson

    if path is None:
        return 0
    with open(path, "rb") as f:
        f.seek(0, 2)
        try:
            while True:
                line = f.readline()
                if not line.endswith(b"\n"):
                    f.seek(-len(line), 1)
                    time.sleep(0.5)
                    continue
                record = orjson.loads(line)
                if keep(record):
                    print(line.decode().rstrip(), flush=True)
        except KeyboardInterrupt:
            return 0


def add_parsers(sub: Any) -> None:
    paths = opt("paths", nargs="*", help="log files or directories (default: audit.directory of --config)")
    filters = [
        opt("--since", default="", help="records at or after this ISO time, e.g. 2026-11-26T09:00"),
        opt("--until", default="", help="records before this ISO time"),
        opt("--principal", default="", help="records of this subject"),
        opt("--model", default="", help="records of this model"),
        opt("--outcome", default="", choices=["", "allow", "deny", "throttled", "rejected", "error"],
            help="records with this outcome"),
        opt("--kind", default="", help="records of this kind: request, checkpoint, tls, start, recovery, ..."),
    ]
    add_area(sub, "audit", "verify, tail or export the audit log", _cmd_audit, {
        "verify": ("check every chain, signature and the stream manifest; exit 1 on any problem", [
            paths, config_opt(),
            opt("--public-key", default="", help="the checkpoint key (default: audit.public_key)"),
            opt("--allow-unsealed", action="store_true",
                help="accept streams that do not end with a shutdown checkpoint (a running gateway's, or one "
                     "cut short by a crash)"),
            opt("--manifest", default="", help="the stream manifest (default: streams.json in the directory given)"),
            opt("--no-manifest", action="store_true",
                help="do not require a stream manifest (logs written before it existed)"),
        ]),
        "tail": ("print the last records as JSON lines, in time order across streams", [
            paths, config_opt(), opt("-n", "--lines", type=int, default=20, help="how many records"),
            opt("-f", "--follow", action="store_true", help="keep printing new records"), *filters,
        ]),
        "export": ("print every record that matches the filters as JSON lines", [paths, config_opt(), *filters]),
    })
