"""Value checkers: each validates one config value and returns it normalised.

A checker is called as ``check(value, path)`` and raises :class:`ConfigError` with a message of
the form ``path: expected <what>, got <value>``. ``describe`` is the "<what>" part, reused by
the generated docs so the documented type is the type actually checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from funczero.config.errors import ConfigError, show

__all__ = [
    "INT64_MAX",
    "Check",
    "betas",
    "boolean",
    "choice",
    "integer",
    "mapping",
    "number",
    "optional",
    "string",
]

INT64_MAX = 2**63 - 1
"""Integers any key accepts lie in int64 (counts become int64 tensors or loop bounds)."""


class Check:
    """A named validator: ``fn(value)`` returns the normalised value, or ``_BAD`` / a ``_Bad``."""

    def __init__(self, describe: str, fn: Callable[[Any], Any]) -> None:
        self.describe = describe
        self._fn = fn

    def __call__(self, value: Any, path: str) -> Any:
        out = self._fn(value)
        if out is _BAD:
            raise ConfigError(f"{path}: expected {self.describe}, got {show(value)}")
        if isinstance(out, _Bad):
            raise ConfigError(f"{path}: {out.reason}, got {show(value)}")
        return out


_BAD = object()


class _Bad:
    """A rejection with its own reason (for limits that ``describe`` does not spell out)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _is_num(value: Any) -> bool:
    """A finite int or float, not a bool (huge ints are numbers; float() of them may overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _bounds(
    ge: float | None, gt: float | None, le: float | None, lt: float | None = None
) -> str:
    pairs = ((">", gt), (">=", ge), ("<", lt), ("<=", le))
    parts = [f"{op} {b if isinstance(b, int) else f'{b:g}'}" for op, b in pairs if b is not None]
    return (" " + " and ".join(parts)) if parts else ""


def boolean() -> Check:
    """Accept ``true``/``false`` only (not 0/1 or strings: a typo must not flip a feature)."""
    return Check("true or false", lambda v: v if isinstance(v, bool) else _BAD)


def integer(*, ge: int | None = None, le: int | None = None) -> Check:
    """Accept an integer, including integral floats such as ``5e8`` (pydantic does too).

    Values outside int64 are rejected even without bounds.

    Example:
        >>> integer(ge=1)(5e8, "reduce_bucket_size")
        500000000
        >>> try:
        ...     integer(ge=1)(1e308, "gradient_accumulation_steps")
        ... except ConfigError as e:
        ...     print(e)
        gradient_accumulation_steps: expected an integer >= 1 that fits in int64 (-2**63 to \
2**63 - 1), got 1e+308
    """
    describe = f"an integer{_bounds(ge, None, le)}"

    def fn(v: Any) -> Any:
        if not _is_num(v) or (isinstance(v, float) and not v.is_integer()):
            return _BAD
        if not -INT64_MAX - 1 <= v <= INT64_MAX:
            if (le is not None and v > le) or (ge is not None and v < ge):
                return _BAD  # the stated bound already says why
            return _Bad(f"expected {describe} that fits in int64 (-2**63 to 2**63 - 1)")
        v = int(v)
        return _BAD if (ge is not None and v < ge) or (le is not None and v > le) else v

    return Check(describe, fn)


def number(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Check:
    """Accept a finite int or float (never a bool or a numeric string) within bounds.

    Example:
        >>> number(ge=0)(3, "gradient_clipping")
        3.0
    """

    def fn(v: Any) -> Any:
        if not _is_num(v):
            return _BAD
        try:
            x = float(v)
        except OverflowError:  # an int beyond the float range
            return _BAD
        ok = (ge is None or x >= ge) and (gt is None or x > gt) and (lt is None or x < lt)
        return x if ok and (le is None or x <= le) else _BAD

    return Check(f"a number{_bounds(ge, gt, le, lt)}", fn)


def choice(*options: str | None) -> Check:
    """Accept one of ``options``, case-insensitively; return its canonical spelling.

    ``None`` among the options stands for JSON ``null``.
    """
    shown = ", ".join("null" if o is None else f'"{o}"' for o in options)
    strings = {o.lower(): o for o in options if o is not None}

    def fn(v: Any) -> Any:
        if v is None:
            return None if None in options else _BAD
        return strings.get(v.lower(), _BAD) if isinstance(v, str) else _BAD

    return Check(f"one of {shown}", fn)


def optional(inner: Check) -> Check:
    """Accept ``null`` or whatever ``inner`` accepts."""
    return Check(f"null or {inner.describe}", lambda v: None if v is None else inner._fn(v))


def mapping(*, legacy_bool: bool = False) -> Check:
    """Accept a JSON object (its keys are checked elsewhere); ``legacy_bool``: also true/false."""
    if legacy_bool:
        return Check("an object (or the legacy true/false)",
                     lambda v: v if isinstance(v, (dict, bool)) else _BAD)
    return Check("an object", lambda v: v if isinstance(v, dict) else _BAD)


def string() -> Check:
    """Accept any non-empty string."""
    return Check("a non-empty string", lambda v: v if isinstance(v, str) and v else _BAD)


def betas() -> Check:
    """Accept ``[beta1, beta2]`` with both in [0, 1); returns a tuple of floats."""

    def fn(v: Any) -> Any:
        if not isinstance(v, Sequence) or isinstance(v, str) or len(v) != 2:
            return _BAD
        if not all(_is_num(b) and 0 <= b < 1 for b in v):
            return _BAD
        return (float(v[0]), float(v[1]))

    return Check("a list of two numbers in [0, 1), e.g. [0.9, 0.999]", fn)
