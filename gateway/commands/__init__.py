"""The ``gateway`` command's subcommands beyond serving, one module per area.

Each area is a command with actions as real subcommands (``gateway audit verify [PATHS]``), built
from a table by ``add_area``: every action's help lists only its own flags, and options go before
or after positional arguments. Commands that list or show take ``-o table|json|yaml`` (``emit``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["Opt", "add_area", "add_options", "config_opt", "config_option", "emit", "format_opt", "json_alias", "load",
           "opt"]


def load(args: argparse.Namespace) -> Config:
    """The configuration named by ``--config`` (raises ``ConfigError``; ``main`` reports it)."""
    from gateway.config import load_config

    return load_config(args.config)


@dataclass(frozen=True)
class Opt:
    """One ``add_argument`` call, kept to be made on each action that takes it."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]


def opt(*flags: str, **kwargs: Any) -> Opt:
    return Opt(flags, kwargs)


def config_opt() -> Opt:
    """``--config``, defaulting to ``$GATEWAY_CONFIG``, else ``gateway.toml``."""
    return opt("--config", default=os.environ.get("GATEWAY_CONFIG") or "gateway.toml",
               help="the configuration file (default: $GATEWAY_CONFIG, else gateway.toml)")


def add_options(p: Any, options: Sequence[Opt]) -> None:
    for option in options:
        p.add_argument(*option.flags, **option.kwargs)


def config_option(p: Any) -> None:
    add_options(p, [config_opt()])


def format_opt() -> Opt:
    return opt("-o", "--format", default="table", choices=["table", "json", "yaml"],
               help="print as an aligned table (default), JSON or YAML")


def json_alias() -> Opt:
    """``--json``, the older spelling of ``-o json``."""
    return opt("--json", dest="format", action="store_const", const="json", help="the same as -o json")


Action = tuple[str, Sequence[Opt]]
"""An action's one-line help and its arguments."""


def add_area(sub: Any, name: str, what: str, func: Callable[[argparse.Namespace], int],
             actions: dict[str, Action], epilog: str | None = None) -> None:
    """``gateway NAME ACTION ...``: one subcommand per action, each with only its own arguments.
    Every argument of every action has its default on the area too, so the handler (one per area,
    dispatching on ``args.action``) finds each attribute whichever action ran."""
    area = sub.add_parser(name, help=what, description=what, epilog=epilog)
    chosen = area.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    defaults: dict[str, Any] = {}
    for action, (help_text, options) in actions.items():
        p = chosen.add_parser(action, help=help_text, description=help_text, epilog=epilog)
        for option in options:
            made = p.add_argument(*option.flags, **option.kwargs)
            defaults.setdefault(made.dest, made.default)
        p.set_defaults(func=func)
    area.set_defaults(**defaults)


def emit(rows: list[dict[str, Any]] | dict[str, Any], fmt: str, empty: str = "") -> None:
    """Rows (one dict each, the keys in column order) as a table, JSON or YAML; ``empty`` is what a
    table says when there are none. A single document (a dict) prints as JSON or YAML."""
    if fmt == "json":
        print(json.dumps(rows, indent=2, default=str))
        return
    if fmt == "yaml":
        import yaml

        print(yaml.safe_dump(rows, sort_keys=False, default_flow_style=False), end="")
        return
    if isinstance(rows, dict):
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        if empty:
            print(empty)
        return
    columns = list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)
