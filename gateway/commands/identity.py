"""``gateway users | clients | keys | policy``: the built-in issuer's accounts and keys, and access decisions."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from gateway.commands import add_area, config_opt, emit, format_opt, load, opt

if TYPE_CHECKING:
    from gateway.security.issuer import IssuerStore

__all__ = ["add_parsers"]


def _store(args: argparse.Namespace) -> IssuerStore:
    from gateway.security.issuer import IssuerStore

    config = load(args)
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
        rows = [{"name": name, "roles": list(record.get("roles", []))}
                | ({"description": record.get("description", "")} if kind == "client" else {})
                for name, record in sorted(table.items())]
        emit(rows, args.format, f"no {kind}s")
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
    config = load(args)
    store = _store(args)
    if args.action == "rotate":
        # Retired keys stay published until every token they signed has expired.
        kid = store.rotate(keep_retired_s=config.issuer.token_ttl_s + config.auth.leeway_s)
        print(f"new signing key {kid}; tokens signed by the previous key verify until they expire")
    emit([{"kid": k["jwk"].get("kid"), "alg": k["jwk"].get("alg"), "state": "retired" if k.get("retired_at") else "current"}
          for k in store.signing_keys()], args.format, "no signing keys")
    return 0


def _cmd_policy(args: argparse.Namespace) -> int:
    from gateway.security.rbac import Policy
    from gateway.security.types import Principal

    config = load(args)
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


def add_parsers(sub: Any) -> None:
    name = opt("name", help="the account's name")
    add_area(sub, "users", "people of the built-in issuer (password + TOTP)", _cmd_users, {
        "add": ("add a person; prints the TOTP enrolment once", [
            name, opt("--roles", required=True, help="comma-separated roles, e.g. admin"),
            opt("--password-stdin", action="store_true", help="read the password from stdin"),
            opt("--force", action="store_true", help="replace an existing user's password and TOTP"), config_opt()]),
        "list": ("list the people and their roles", [config_opt(), format_opt()]),
        "remove": ("remove a person (tokens already issued stay valid until they expire)", [name, config_opt()]),
    })
    add_area(sub, "clients", "services of the built-in issuer (client credentials)", _cmd_clients, {
        "add": ("add a service; prints its secret once", [
            name, opt("--roles", required=True, help="comma-separated roles, e.g. inference"),
            opt("--description", default="", help="what the service is"),
            opt("--force", action="store_true", help="issue a new secret for an existing client"), config_opt()]),
        "list": ("list the services and their roles", [config_opt(), format_opt()]),
        "remove": ("remove a service (tokens already issued stay valid until they expire)", [name, config_opt()]),
    })
    add_area(sub, "keys", "the built-in issuer's signing keys", _cmd_keys, {
        "rotate": ("make a new signing key; the previous one verifies until its tokens expire", [config_opt()]),
        "list": ("list the signing keys", [config_opt(), format_opt()]),
    })
    add_area(sub, "policy", "explain an access decision", _cmd_policy, {
        "explain": ("which rule allows or denies a principal a verb on a model, and the answer it would get", [
            opt("--sub", required=True, help="the principal's subject"),
            opt("--roles", default="", help="comma-separated roles"),
            opt("--verb", required=True, help="infer, metadata, list, explain, admin:models, ..."),
            opt("--model", default=None, help="the model the verb is aimed at"),
            opt("--kind", default="person", choices=["person", "service", "certificate"],
                help="what the principal is (a service or certificate cannot step up)"),
            opt("--amr", default="", help="comma-separated amr values, e.g. pwd,otp,mfa"),
            opt("--acr", default="", help="the authentication context class"),
            opt("--auth-age", type=float, default=None, help="seconds since the principal signed in"),
            config_opt()]),
    })
