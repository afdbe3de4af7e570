"""A served unit: a model's default version, or one more version of it served beside the default.

Workers run units, ``routes.json`` and metrics name them by ``key``: the model's name for its
default version (whichever version that is after a reload), ``name@version`` for a pinned one.
``@`` is never valid in a model name, so a key always splits back into its unit.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Unit"]

SEPARATOR = "@"


@dataclass(frozen=True, slots=True)
class Unit:
    model: str
    version: str | None = None
    """None: the model's default version; else the pinned version served beside it."""

    @property
    def key(self) -> str:
        return self.model if self.version is None else f"{self.model}{SEPARATOR}{self.version}"

    @property
    def default(self) -> bool:
        return self.version is None

    @classmethod
    def parse(cls, key: str) -> Unit:
        model, sep, version = key.partition(SEPARATOR)
        return cls(model, version if sep else None)

    def __str__(self) -> str:
        return self.key
