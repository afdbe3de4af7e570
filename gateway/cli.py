"""The ``gateway`` command (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.security.issuer import IssuerStore

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


def _cmd_serve(args: argparse.Namespace) -> int:
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
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    warnings = config.insecure_settings()
    print(f"{args.config}: valid; {len(config.models)} model(s)")
    for w in warnings:
        print(f"insecure: {w}")
    return 1 if warnings and args.strict else 0


def _load(args: argparse.Namespace) -> Config:
    from gateway.config import load_config

    return load_config(args.config)


def _store(args: argparse.Namespace) -> IssuerStore:
    from gateway.security.issuer import IssuerStore

    config = _load(args)
    if not config.issuer.enabled:
        raise SystemExit("gateway: the built-in issuer is disabled in this configuration ([issuer] enabled = false)")
    return IssuerStore(config.issuer.directory)


def _roles(text: str) -> list[str]:
    roles = [r.strip() for r in text.split(",") if r.strip()]
    if not roles:
        raise SystemExit("gateway: --roles needs at least one role")
    return roles


def _list_or_remove(store: IssuerStore, kind: str, args: argparse.Namespace) -> int:
    if args.action == "list":
        table = store.users() if kind == "user" else store.clients()
        for name, record in sorted(table.items()):
            print(f"{name}\troles={','.join(record.get('roles', []))}\t{record.get('description', '')}".rstrip())
        return 0
    if not store.remove(kind, args.name):
        print(f"gateway: no {kind} {args.name!r}", file=sys.stderr)
        return 1
    print(f"{kind} {args.name} removed; tokens it already holds stay valid until they expire")
    return 0


def _cmd_users(args: argparse.Namespace) -> int:
    import getpass

    from gateway.security.issuer import enrolment_uri

    store = _store(args)
    if args.action != "add":
        return _list_or_remove(store, "user", args)
    if args.name in store.users() and not args.force:
        print(f"gateway: user {args.name!r} exists (--force replaces its password and TOTP)", file=sys.stderr)
        return 1
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if password != getpass.getpass("again: "):
            print("gateway: the passwords differ", file=sys.stderr)
            return 1
    if len(password) < 12:
        print("gateway: passwords need at least 12 characters (NIST SP 800-63B allows 8; we ask for more)",
              file=sys.stderr)
        return 1
    secret = store.add_user(args.name, password, _roles(args.roles))
    print(f"user {args.name} added with roles {args.roles}")
    print("enrol this in an authenticator app (it is shown once):")
    print(enrolment_uri(secret, args.name, "gateway"))
    return 0


def _cmd_clients(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.action != "add":
        return _list_or_remove(store, "client", args)
    if args.name in store.clients() and not args.force:
        print(f"gateway: client {args.name!r} exists (--force issues a new secret)", file=sys.stderr)
        return 1
    secret = store.add_client(args.name, _roles(args.roles), args.description)
    print(f"client {args.name} added with roles {args.roles}; its secret (shown once, stored only hashed):")
    print(secret)
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _store(args)
    if args.action == "rotate":
        # Retired keys stay published until every token they signed has expired.
        kid = store.rotate(keep_retired_s=config.issuer.token_ttl_s + config.auth.leeway_s)
        print(f"new signing key {kid}; tokens signed by the previous key verify until they expire")
    for k in store.signing_keys():
        state = "retired" if k.get("retired_at") else "current"
        print(f"{k['jwk'].get('kid')}\t{k['jwk'].get('alg')}\t{state}")
    return 0


def _cmd_policy(args: argparse.Namespace) -> int:
    from gateway.security.rbac import Policy
    from gateway.security.tokens import Principal

    config = _load(args)
    principal = Principal(
        subject=args.sub, kind=args.kind, roles=frozenset(_roles(args.roles)) if args.roles else frozenset(),
        amr=tuple(a for a in args.amr.split(",") if a), acr=args.acr or None,
        auth_time=int(time.time() - args.auth_age) if args.auth_age is not None else None,
    )
    policy = Policy(config.rbac)
    decision = policy.decide(principal, args.verb, args.model)
    verdict = "ALLOW" if decision.allowed else "DENY"
    print(f"{verdict} {args.sub} {args.verb} {args.model or '-'}")
    print(f"  rule:   {decision.rule or '(none: deny by default)'}")
    print(f"  reason: {decision.reason}")
    if not decision.allowed:
        refusal = policy.refusal(principal, decision)
        print(f"  answer: {refusal.status} {refusal.title}"
              + (f"  [{refusal.headers['WWW-Authenticate']}]" if "WWW-Authenticate" in refusal.headers else ""))
    return 0 if decision.allowed else 1


def _cmd_audit(args: argparse.Namespace) -> int:
    from gateway.audit.chain import load_public_key, verify_paths

    if args.action == "verify":
        key_path = args.public_key or _load(args).audit.public_key
        report = verify_paths(args.paths, load_public_key(key_path), allow_unsealed=args.allow_unsealed)
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

    paths = args.paths or [_load(args).audit.directory]
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

    records: list[bytes] = []
    for f in files:
        for line in f.read_bytes().splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn last line
            if keep(record):
                records.append(line)
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


def _cmd_infer(args: argparse.Namespace) -> int:
    """``gateway infer MODEL --input x.npy|x.json``: one inference through the SDK."""
    import json as jsonlib

    import numpy as np

    from gateway.client import Client, ClientError, RetryPolicy

    path = Path(args.input)
    if path.suffix == ".npy":
        inputs: dict[str, np.ndarray] | np.ndarray = np.load(path, allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            inputs = {name: npz[name] for name in npz.files}
    else:
        def array(value: object) -> np.ndarray:  # JSON numbers with a fraction are taken as FP32
            a = np.asarray(value)
            return a.astype(np.float32) if a.dtype.kind == "f" else a

        doc = jsonlib.loads(path.read_text())
        inputs = {k: array(v) for k, v in doc.items()} if isinstance(doc, dict) else array(doc)
    try:
        with Client.from_credentials(args.credentials, args.principal,
                                     retry=RetryPolicy(deadline_s=args.deadline)) as client:
            outputs = client.infer(args.model, inputs, version=args.version, binary=not args.json)
    except ClientError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    if args.output:
        np.savez(args.output, **outputs)  # type: ignore[arg-type]
        print(f"wrote {', '.join(outputs)} to {args.output}")
    else:
        print(jsonlib.dumps({name: {"shape": list(a.shape), "dtype": str(a.dtype), "data": a.tolist()}
                             for name, a in outputs.items()}))
    return 0


def _resign(folder: Path, signing_key: str) -> None:
    """The folder's files changed: sign it again when this machine holds the signing key."""
    from gateway.registry.signing import sign_model

    if Path(signing_key).is_file():
        sign_model(folder, Path(signing_key))
        print(f"re-signed {folder} with {signing_key}")
    else:
        print(f"note: {folder} changed and its signature no longer matches; sign it with `gateway models sign`")


def _cmd_models(args: argparse.Namespace) -> int:
    """``sign``, ``verify``, ``check``, ``encrypt`` and ``rewrap`` a model version folder
    (``<root>/<name>/<version>``)."""
    from gateway.registry.admission import AdmissionError, admit
    from gateway.registry.loading import load_model_bytes
    from gateway.registry.manifest import ManifestError, load_manifest
    from gateway.registry.sealing import SEALED_NAME, SealError, key_provider, rewrap, seal
    from gateway.registry.signing import SignatureError, sign_model, verify_model

    supply = _load(args).supply
    folder = Path(args.folder)
    try:
        manifest = load_manifest(folder)
        if args.action == "check":
            data = load_model_bytes(manifest, supply)
            report = admit(data, supply, None if (folder / SEALED_NAME).exists() else folder)
            print(f"{manifest.name}/{manifest.version}: admitted ({report.nodes} nodes, opset {report.opset}, "
                  f"{report.initializer_bytes} bytes of initializers, domains {list(report.domains)})")
            return 0
        if args.action == "sign":
            signature = sign_model(folder, Path(args.key or supply.signing_key))
            print(f"signed {folder} -> {signature}")
            return 0
        if args.action == "verify":
            keys = [Path(k) for k in (args.trusted_key or supply.trusted_keys)]
            key = verify_model(folder, keys)
            print(f"{manifest.name}/{manifest.version}: signature verified with {key}")
            return 0
        if args.action == "encrypt":
            plaintext = manifest.read_verified()
            admit(plaintext, supply, None)
            sealed = seal(plaintext, manifest.name, manifest.version, key_provider(supply))
            tmp = folder / (SEALED_NAME + ".tmp")
            tmp.write_bytes(sealed)
            os.replace(tmp, folder / SEALED_NAME)
            if not args.keep_plaintext:
                manifest.onnx_path.unlink()
            print(f"sealed {folder / SEALED_NAME}" + ("" if args.keep_plaintext else f"; removed {manifest.onnx_path}"))
            _resign(folder, supply.signing_key)
            return 0
        old = key_provider(supply)
        new = key_provider(supply, kek_file=args.new_kek_file)
        path = folder / SEALED_NAME
        tmp = folder / (SEALED_NAME + ".tmp")
        tmp.write_bytes(rewrap(path.read_bytes(), old, new))
        os.replace(tmp, path)
        print(f"rewrapped {path} from key {old.kek_id()} to {new.kek_id()} (the model itself was not re-encrypted)")
        _resign(folder, supply.signing_key)
        return 0
    except (ManifestError, SealError, AdmissionError, SignatureError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Secure model-serving gateway.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a development PKI, configuration and credentials")
    p.add_argument("--dir", default=".", help="where to write certs/, gateway.toml, credentials.json")
    p.add_argument("--models", default="models", help="model repository the configuration points at")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--force", action="store_true", help="replace existing keys, certificates and config")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("serve", help="start the workers and serve HTTPS")
    p.add_argument("--config", default="gateway.toml")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check", help="validate a configuration and list its insecure settings")
    p.add_argument("--config", default="gateway.toml")
    p.add_argument("--strict", action="store_true", help="exit 1 if any setting weakens security")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("users", help="people of the built-in issuer (password + TOTP)")
    p.add_argument("action", choices=["add", "list", "remove"])
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--roles", default="", help="comma-separated roles, e.g. admin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--force", action="store_true", help="replace an existing user")
    p.add_argument("--config", default="gateway.toml")
    p.set_defaults(func=_cmd_users)

    p = sub.add_parser("clients", help="services of the built-in issuer (client credentials)")
    p.add_argument("action", choices=["add", "list", "remove"])
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--roles", default="", help="comma-separated roles, e.g. inference")
    p.add_argument("--description", default="")
    p.add_argument("--force", action="store_true", help="issue a new secret for an existing client")
    p.add_argument("--config", default="gateway.toml")
    p.set_defaults(func=_cmd_clients)

    p = sub.add_parser("keys", help="the built-in issuer's signing keys")
    p.add_argument("action", choices=["rotate", "list"])
    p.add_argument("--config", default="gateway.toml")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser("audit", help="verify, tail or export the audit log")
    p.add_argument("action", choices=["verify", "tail", "export"])
    p.add_argument("paths", nargs="*", help="log files or directories (default: audit.directory of --config)")
    p.add_argument("--config", default="gateway.toml")
    p.add_argument("--public-key", default="", help="verify: the checkpoint key (default: audit.public_key)")
    p.add_argument("--allow-unsealed", action="store_true",
                   help="verify: accept records after the last checkpoint (a log cut short by a crash)")
    p.add_argument("-n", "--lines", type=int, default=20, help="tail: how many records")
    p.add_argument("-f", "--follow", action="store_true", help="tail: keep printing new records")
    p.add_argument("--since", default="", help="ISO time, e.g. 2026-11-26T09:00")
    p.add_argument("--until", default="")
    p.add_argument("--principal", default="", help="subject")
    p.add_argument("--model", default="")
    p.add_argument("--outcome", default="", choices=["", "allow", "deny", "throttled", "rejected", "error"])
    p.add_argument("--kind", default="", help="request, checkpoint, tls, start, recovery")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("models", help="sign, verify, check, encrypt or rewrap a model version folder")
    p.add_argument("action", choices=["sign", "verify", "check", "encrypt", "rewrap"])
    p.add_argument("folder", help="<models root>/<name>/<version>")
    p.add_argument("--config", default="gateway.toml")
    p.add_argument("--keep-plaintext", action="store_true", help="encrypt: do not remove model.onnx afterwards")
    p.add_argument("--new-kek-file", default="", help="rewrap: the new key-encryption key")
    p.add_argument("--key", default="", help="sign: the EC private key (default: supply.signing_key)")
    p.add_argument("--trusted-key", action="append", default=[], help="verify: a public key (repeatable; "
                   "default: supply.trusted_keys)")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("infer", help="run one inference through the SDK")
    p.add_argument("model")
    p.add_argument("--input", required=True, help=".npy (one input), .npz (named inputs) or .json (array or {name: array})")
    p.add_argument("--version", default=None)
    p.add_argument("--credentials", default="credentials.json", help="written by `gateway init`")
    p.add_argument("--principal", default="demo")
    p.add_argument("--output", default="", help="save the outputs to this .npz instead of printing them")
    p.add_argument("--json", action="store_true", help="send JSON tensors instead of binary ones")
    p.add_argument("--deadline", type=float, default=30.0, help="seconds for the call, retries included")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("policy", help="explain an access decision")
    p.add_argument("action", choices=["explain"])
    p.add_argument("--sub", required=True, help="the principal's subject")
    p.add_argument("--roles", default="", help="comma-separated roles")
    p.add_argument("--verb", required=True, help="infer, metadata, list, explain, admin:models, ...")
    p.add_argument("--model", default=None)
    p.add_argument("--kind", default="person", choices=["person", "service", "certificate"])
    p.add_argument("--amr", default="", help="comma-separated amr values, e.g. pwd,otp,mfa")
    p.add_argument("--acr", default="")
    p.add_argument("--auth-age", type=float, default=None, help="seconds since the principal signed in")
    p.add_argument("--config", default="gateway.toml")
    p.set_defaults(func=_cmd_policy)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("users", "clients") and args.action in ("add", "remove") and not args.name:
        parser.error(f"{args.command} {args.action} needs a name")
    if args.command in ("users", "clients") and args.action == "add" and not args.roles:
        parser.error(f"{args.command} add needs --roles")
    if args.command == "models" and args.action == "rewrap" and not args.new_kek_file:
        parser.error("models rewrap needs --new-kek-file")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gateway.config import ConfigError

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
