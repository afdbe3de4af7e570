"""``gateway principals``: the model-extraction alarms in force, and clearing them, through a
running gateway with an operator's credentials (verb ``admin:incident``, second factor required):
the bearer token in ``GATEWAY_TOKEN``, or a sign-in with the credentials file's person."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["add_parsers"]


def _cmd_principals(args: argparse.Namespace) -> int:
    from gateway.client import Client, ClientError, RetryPolicy

    # A token already held (GATEWAY_TOKEN) is used as is; otherwise the operator signs in with the
    # credentials file's password and a TOTP code (a code is accepted once: one sign-in per 30 s).
    held = {"token": os.environ["GATEWAY_TOKEN"]} if os.environ.get("GATEWAY_TOKEN") else {}
    try:
        with Client.from_credentials(args.credentials, args.principal, retry=RetryPolicy(deadline_s=30),
                                     **held) as client:
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
            if not args.name or not args.reason.strip():
                print("gateway: principals clear NAME --reason WHY (both are required)", file=sys.stderr)
                return 2
            cleared = client.clear_principal(args.name, args.reason, args.model or None)
    except ClientError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except (OSError, KeyError, ValueError) as exc:
        print(f"gateway: {args.credentials}: {exc!r}", file=sys.stderr)
        return 1
    what = f"on {args.model}" if args.model else "on every model"
    print(f"cleared {len(cleared)} alarm(s) of {args.name} {what}; its watched queries are forgotten")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("principals", help="model-extraction alarms: list them, or clear a principal's")
    p.add_argument("action", choices=["list", "clear"])
    p.add_argument("name", nargs="?", default="", help="clear: the principal as `principals list` names it (issuer|subject)")
    p.add_argument("--model", default="", help="clear: only this model's alarm (default: all of the principal's)")
    p.add_argument("--reason", default="", help="clear: why (required; kept in the audit log)")
    p.add_argument("--credentials", default="credentials.json", help="written by `gateway init`")
    p.add_argument("--principal", default="admin", help="the operator's entry in the credentials file")
    p.add_argument("--json", action="store_true", help="list: as JSON")
    p.set_defaults(func=_cmd_principals)
