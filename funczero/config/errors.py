"""The config error type and the helpers every parser uses to phrase its messages."""

from __future__ import annotations

import difflib
import json
import math
import sys
import warnings
from collections.abc import Iterable

__all__ = [
    "MAX_SHOWN",
    "ConfigError",
    "ConfigWarning",
    "closest",
    "did_you_mean",
    "join_path",
    "key_text",
    "show",
    "warn",
]

MAX_SHOWN = 50
"""A :class:`ConfigError` message lists at most this many problems (``problems`` has them all)."""

_LONG_KEY = 100  # keys longer than this are no typo of a real key: no suggestion, shown truncated


class ConfigError(ValueError):
    """A DeepSpeed/funczero config is invalid.

    The message names the full key path (``zero_optimization.stage``), the offending value and
    the fix. When several keys are wrong, all of them are reported at once, one per line, and
    ``problems`` holds the individual messages.

    Example:
        >>> from funczero.config import Config, ConfigError
        >>> try:
        ...     Config.load({"train_batch_size": 8, "gradient_clippin": 1.0}, world_size=1)
        ... except ConfigError as e:
        ...     print(e.problems[0])
        unknown key 'gradient_clippin'; did you mean 'gradient_clipping'?
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            shown = self.problems[:MAX_SHOWN]
            lines = "\n".join(f"  - {p}" for p in shown)
            more = len(self.problems) - len(shown)
            tail = f"\n  ... and {more} more (see .problems)" if more else ""
            message = f"{len(self.problems)} problems in the config:\n{lines}{tail}"
        super().__init__(message)


# modules whose frames a warning skips, so it points at the user's call
_CONFIG_CODE = ("funczero.config", "funczero.from_config")


class ConfigWarning(UserWarning):
    """A config key was accepted but deprecated, or its value does not do what DeepSpeed's does."""


def join_path(prefix: str, key: str) -> str:
    """Return the dotted path of ``key`` inside the block at ``prefix`` ('' is the top level)."""
    return f"{prefix}.{key_text(key)}" if prefix else key_text(key)


def key_text(key: str) -> str:
    """``key`` as it may appear in a message: printable, and at most ~100 characters.

    Example:
        >>> key_text("stage"), key_text("a\\nb"), len(key_text("k" * 10_000))
        ('stage', '"a\\\\nb"', 105)
    """
    if key.isprintable() and len(key) <= _LONG_KEY:
        return key
    text = json.dumps(key[:_LONG_KEY])  # escapes control characters and lone surrogates
    return text if len(key) <= _LONG_KEY else text[:-1] + '..."'


def show(value: object) -> str:
    """Render a config value the way it appears in JSON (strings quoted), for messages.

    Never fails and never takes long: huge integers are described by their size, and the text
    is cut at 80 characters.

    Example:
        >>> show("auto"), show(float("inf")), show(10**5000)
        ('"auto"', 'Infinity', 'an integer of about 5001 digits')
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def closest(key: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate closest to ``key`` (difflib), or ``None`` when none is close."""
    pool = list(candidates)
    if len(key) > _LONG_KEY:
        return None
    match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
    if match:
        return match[0]
    # Case and separator slips ("Stage", "reduce-bucket-size") are common in hand-written JSON.
    folded = {c.lower().replace("-", "_"): c for c in pool}
    return folded.get(key.lower().replace("-", "_"))


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    match = closest(key, candidates)
    return f"; did you mean '{match}'?" if match else ""


def warn(message: str) -> None:
    """Emit a :class:`ConfigWarning` attributed to the first caller outside the config code."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the caller of warn()
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_CONFIG_CODE):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(message, ConfigWarning, stacklevel=level)
