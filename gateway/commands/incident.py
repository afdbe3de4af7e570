"""``gateway admin`` (incident controls) and ``gateway principals`` (model-extraction alarms),
through a running gateway with an operator's credentials (verb ``admin:incident``, second factor
required): the bearer token in ``GATEWAY_TOKEN``, or a sign-in with the credentials file's person."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["add_parsers"]


def _client(args: argparse.Namespace) -> Any:
    from gateway.client import Client, RetryPolicy

    # A token already held (GATEWAY_TOKEN) is used as is; otherwise the operator signs in with the
    # credentials file's password and a TOTP code (a code is accepted once: one sign-in per 30 s).
    held = {"token": os.environ["GATEWAY_TOKEN"]} if os.environ.get("GATEWAY_TOKEN") else {}
    return Client.from_credentials(args.credentials, args.principal, retry=RetryPolicy(deadline_s=30), **held)


ADMIN_ACTIONS: dict[str, tuple[str, ...]] = {
    # the command: the positional arguments it takes, as the API's parameters
    "revoke-token": ("jti",), "revoke-principal": ("principal",), "reinstate-principal": ("principal",),
    "revoke-certificate": ("sha256",), "reinstate-certificate": ("sha256",), "quarantine": ("model", "version"),
    "release": ("model", "version"), "lockdown": (), "lift": (),
}


def _with_client(args: argparse.Namespace, work: Callable[[Any], int]) -> int:
    """``work(client)``, its refusals and unreadable credentials said in one line each."""
    from gateway.client import ClientError

    try:
        with _client(args) as client:
            return work(client)
    except ClientError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
    except (OSError, KeyError, ValueError) as exc:
        print(f"gateway: {args.credentials}: {exc!r}", file=sys.stderr)
    return 1


def _cmd_admin(args: argparse.Namespace) -> int:
    names = ADMIN_ACTIONS.get(args.action, ())
    if args.action != "status" and not args.reason.strip():
        print(f"gateway: admin {args.action} needs --reason WHY (it is kept in the audit log)", file=sys.stderr)
        return 2
    if args.action not in ("status", "rotate-key") and len(args.values) != len(names):
        print(f"gateway: admin {args.action} takes {' '.join(n.upper() for n in names) or 'no arguments'}",
              file=sys.stderr)
        return 2

    def work(client: Any) -> int:
        if args.action == "status":
            print(json.dumps(client.request("GET", "/admin/incidents").json(), indent=2))
        elif args.action == "rotate-key":
            kid = client.request("POST", "/admin/keys/rotate", json_body={"reason": args.reason}).json()["kid"]
            print(f"new signing key {kid}; tokens signed by the previous key verify until they expire")
        else:
            body: dict[str, Any] = {"action": args.action, "reason": args.reason, **dict(zip(names, args.values))}
            if str(body.get("sha256", "")).startswith("serial:"):  # a certificate by its serial number instead
                body["serial"] = body.pop("sha256").removeprefix("serial:")
            if args.action == "lockdown":
                body["break_glass"] = args.break_glass
            answer = client.request("POST", "/admin/incidents/actions", json_body=body).json()
            print(f"{args.action}: in force on every replica (controls version {answer['version']})")
        return 0

    return _with_client(args, work)


def _cmd_principals(args: argparse.Namespace) -> int:
    if args.action == "clear" and (not args.name or not args.reason.strip()):
        print("gateway: principals clear NAME --reason WHY (both are required)", file=sys.stderr)
        return 2

    def work(client: Any) -> int:
        if args.action == "list":
            alarms = client.alarms()
            if args.json:
                print(json.dumps(alarms, indent=2))
            elif not alarms:
                print("no extraction alarms in force")
            for a in [] if args.json else alarms:
                print(f"{a['time']}  {a['principal']}  {a['model']}  action={a['action']}  score={a['score']}  "
                      f"after {a['queries']} queries  (request {a['request_id']})")
            return 0
        cleared = client.clear_principal(args.name, args.reason, args.model or None)
        what = f"on {args.model}" if args.model else "on every model"
        print(f"cleared {len(cleared)} alarm(s) of {args.name} {what}; its watched queries are forgotten")
        return 0

    return _with_client(args, work)


def _cmd_token(args: argparse.Namespace) -> int:
    """Sign in once and print the bearer token, for ``export GATEWAY_TOKEN=...`` (a TOTP code is
    accepted once: commands that follow each other within 30 s share one sign-in)."""
    from gateway.client import Client, ClientError

    try:
        with Client.from_credentials(args.credentials, args.principal) as client:
            if client.auth is None:
                print(f"gateway: {args.principal} has no token credentials in {args.credentials}", file=sys.stderr)
                return 1
            print(client.auth.token())
    except ClientError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except (OSError, KeyError, ValueError) as exc:
        print(f"gateway: {args.credentials}: {exc!r}", file=sys.stderr)
        return 1
    return 0


def _credential_options(p: Any) -> None:
    p.add_argument("--credentials", default="credentials.json", help="written by `gateway init`")
    p.add_argument("--principal", default="admin", help="the operator's entry in the credentials file")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("admin", help="incident controls on a running gateway: revoke, quarantine, lockdown, "
                       "rotate the issuer's key, status")
    p.add_argument("action", choices=["status", "rotate-key", *ADMIN_ACTIONS])
    p.add_argument("values", nargs="*", help="revoke-token JTI | revoke-principal/reinstate-principal ISSUER|SUBJECT | "
                   "revoke-certificate/reinstate-certificate SHA256 (or serial:HEX) | quarantine/release MODEL VERSION")
    p.add_argument("--reason", default="", help="why (required for every change; kept in the audit log)")
    p.add_argument("--break-glass", action="append", default=[], help="lockdown: a principal still served "
                   "(repeatable; you are always one)")
    _credential_options(p)
    p.set_defaults(func=_cmd_admin)

    p = sub.add_parser("token", help="sign in with a credentials file's principal and print the bearer token")
    _credential_options(p)
    p.set_defaults(func=_cmd_token)

    p = sub.add_parser("principals", help="model-extraction alarms: list them, or clear a principal's")
    p.add_argument("action", choices=["list", "clear"])
    p.add_argument("name", nargs="?", default="", help="clear: the principal as `principals list` names it (issuer|subject)")
    p.add_argument("--model", default="", help="clear: only this model's alarm (default: all of the principal's)")
    p.add_argument("--reason", default="", help="clear: why (required; kept in the audit log)")
    _credential_options(p)
    p.add_argument("--json", action="store_true", help="list: as JSON")
    p.set_defaults(func=_cmd_principals)
