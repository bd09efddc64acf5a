"""Events, the writer protocol, and the error for a monitor whose library is not installed.

An event is DeepSpeed's ``(name, value, samples)`` triple: ``("Train/Samples/train_loss", 2.31,
4096)`` puts the loss at 4096 training samples on the x-axis.

Example:
    >>> try:
    ...     require("no_such_module_xyz", extra="tensorboard", block="tensorboard")
    ... except MissingExtraError as e:
    ...     print(e)
    the "tensorboard" block is enabled but its library is not installed (No module named 'no_such_module_xyz'); pip install 'funczero[tensorboard]', or set "tensorboard": {"enabled": false}
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Protocol

__all__ = ["Event", "EventWriter", "MissingExtraError", "require"]

Event = tuple[str, float, int]
"""``(name, value, samples)``, as DeepSpeed's monitors take them."""


class EventWriter(Protocol):
    """What every monitor implements (DeepSpeed's ``Monitor`` interface plus ``close``)."""

    def write_events(self, events: Sequence[Event]) -> None:
        """Record ``events``; called on rank 0 only."""

    def close(self) -> None:
        """Flush and release files or connections; called once."""


class MissingExtraError(ImportError):
    """A monitor block is enabled but the optional library it needs is not installed."""


def require(module: str, *, extra: str, block: str | None = None,
            purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install.

    Args:
        module: what to import.
        extra: the funczero extra that installs it.
        block: the config block that asked for it (the message says how to switch it off).
        purpose: otherwise, what needs it (``"funczero plot"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if block is None:
            raise MissingExtraError(
                f"{purpose or 'this'} needs {module}, which is not installed ({e}); "
                f"pip install 'funczero[{extra}]'"
            ) from e
        raise MissingExtraError(
            f'the "{block}" block is enabled but its library is not installed ({e}); '
            f"pip install 'funczero[{extra}]', or set \"{block}\": {{\"enabled\": false}}"
        ) from e
