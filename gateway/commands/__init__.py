"""The ``gateway`` command's subcommands beyond serving, one module per area."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["load"]


def load(args: argparse.Namespace) -> Config:
    """The configuration named by ``--config`` (raises ``ConfigError``; ``main`` reports it)."""
    from gateway.config import load_config

    return load_config(args.config)
