"""The ``gateway`` command's subcommands beyond serving, one module per area."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["config_option", "load"]


def load(args: argparse.Namespace) -> Config:
    """The configuration named by ``--config`` (raises ``ConfigError``; ``main`` reports it)."""
    from gateway.config import load_config

    return load_config(args.config)


def config_option(p: Any) -> None:
    """``--config``, defaulting to ``$GATEWAY_CONFIG``, else ``gateway.toml``."""
    p.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG") or "gateway.toml",
                   help="the configuration file (default: $GATEWAY_CONFIG, else gateway.toml)")
