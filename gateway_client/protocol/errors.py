"""The protocol's one error: a message that does not follow the Open Inference Protocol."""

from __future__ import annotations

from typing import Any

__all__ = ["ProtocolError"]


class ProtocolError(ValueError):
    """A malformed or inconsistent message, naming what is wrong (``detail``) and where
    (``extensions``, e.g. ``field="inputs[0].shape"``). The gateway answers it 400."""

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions

    def __reduce__(self) -> tuple[Any, ...]:  # decoder processes send it back whole
        return _restore, (self.detail, self.extensions)


def _restore(detail: str, extensions: dict[str, Any]) -> ProtocolError:
    return ProtocolError(detail, **extensions)
