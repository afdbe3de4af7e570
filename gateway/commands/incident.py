"""``gateway admin`` (incident controls) and ``gateway principals`` (model-extraction alarms),
through a running gateway with an operator's credentials (verb ``admin:incident``, second factor
required): the bearer token in ``GATEWAY_TOKEN``, or a sign-in with the credentials file's person."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from gateway.commands import Action, Opt, add_area, add_options, emit, format_opt, json_alias, opt

__all__ = ["add_parsers"]


def _client(args: argparse.Namespace) -> Any:
    from gateway_client import Client, RetryPolicy

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
    from gateway_client import ClientError

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
    values = [getattr(args, f"target_{name}") for name in names]

    def work(client: Any) -> int:
        if args.action == "status":
            emit(client.request("GET", "/admin/incidents").json(), args.format)  # nested: its table is JSON
        elif args.action == "rotate-key":
            kid = client.request("POST", "/admin/keys/rotate", json_body={"reason": args.reason}).json()["kid"]
            print(f"new signing key {kid}; tokens signed by the previous key verify until they expire")
        else:
            body: dict[str, Any] = {"action": args.action, "reason": args.reason, **dict(zip(names, values))}
            if str(body.get("sha256", "")).startswith("serial:"):  # a certificate by its serial number instead
                body["serial"] = body.pop("sha256").removeprefix("serial:")
            if args.action == "lockdown":
                body["break_glass"] = args.break_glass
            answer = client.request("POST", "/admin/incidents/actions", json_body=body).json()
            print(f"{args.action}: in force on every replica (controls version {answer['version']})")
        return 0

    return _with_client(args, work)


def _cmd_principals(args: argparse.Namespace) -> int:
    if args.action == "clear" and not args.reason.strip():
        print("gateway: principals clear NAME --reason WHY (both are required)", file=sys.stderr)
        return 2

    def work(client: Any) -> int:
        if args.action == "list":
            alarms = client.alarms()
            columns = ("time", "principal", "model", "action", "score", "queries", "request_id")
            table = [{c: a.get(c) for c in columns} for a in alarms]
            emit(table if args.format == "table" else alarms, args.format, "no extraction alarms in force")
            return 0
        cleared = client.clear_principal(args.name, args.reason, args.model or None)
        what = f"on {args.model}" if args.model else "on every model"
        print(f"cleared {len(cleared)} alarm(s) of {args.name} {what}; its watched queries are forgotten")
        return 0

    return _with_client(args, work)


def _cmd_token(args: argparse.Namespace) -> int:
    """Sign in once and print the bearer token, for ``export GATEWAY_TOKEN=...`` (a TOTP code is
    accepted once: commands that follow each other within 30 s share one sign-in)."""
    from gateway_client import Client, ClientError

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


def _credentials() -> list[Opt]:
    return [opt("--credentials", default="credentials.json", help="written by `gateway init`"),
            opt("--principal", default="admin", help="the operator's entry in the credentials file")]


def add_parsers(sub: Any) -> None:
    reason = opt("--reason", required=True, help="why (kept in the audit log)")
    actions: dict[str, Action] = {
        "status": ("the incident controls in force", [*_credentials(), format_opt()]),
        "rotate-key": ("rotate the built-in issuer's signing key on the running gateway", [reason, *_credentials()]),
    }
    what = {"revoke-token": "refuse a token by its jti", "revoke-principal": "refuse every token of ISSUER|SUBJECT",
            "reinstate-principal": "lift a principal's revocation",
            "revoke-certificate": "refuse a client certificate by SHA256 (or serial:HEX)",
            "reinstate-certificate": "lift a certificate's revocation", "quarantine": "stop serving MODEL VERSION",
            "release": "serve a quarantined version again", "lockdown": "serve only break-glass principals",
            "lift": "end the lockdown"}
    for action, names in ADMIN_ACTIONS.items():
        arguments = [opt(f"target_{name_}", metavar=name_.upper(), help=f"the {name_}") for name_ in names]
        extra = [opt("--break-glass", action="append", default=[],
                     help="a principal still served (repeatable; you are always one)")] if action == "lockdown" else []
        actions[action] = (what[action], [*arguments, reason, *extra, *_credentials()])
    add_area(sub, "admin", "incident controls on a running gateway: revoke, quarantine, lockdown, rotate the "
             "issuer's key, status", _cmd_admin, actions)

    p = sub.add_parser("token", help="sign in with a credentials file's principal and print the bearer token")
    add_options(p, _credentials())
    p.set_defaults(func=_cmd_token)

    add_area(sub, "principals", "model-extraction alarms: list them, or clear a principal's", _cmd_principals, {
        "list": ("the extraction alarms in force", [
            *_credentials(), format_opt(), json_alias()]),
        "clear": ("lift a principal's alarms (its watched queries are forgotten too)", [
            opt("name", help="the principal as `principals list` names it (issuer|subject)"),
            opt("--model", default="", help="only this model's alarm (default: all of the principal's)"),
            reason, *_credentials()]),
    })
