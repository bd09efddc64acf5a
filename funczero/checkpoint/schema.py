"""Checking the values of ``index.json``: each failure names the key, the value and the rule.

The index may come from anywhere (see :mod:`funczero.checkpoint.safe_io`): values are shown cut
short, booleans are not integers, and integers must fit in int64 like torch's sizes.

Example:
    >>> schema = Schema("ckpt/100")
    >>> schema.get_int({"step": 7}, "step", "index")
    7
    >>> schema.get_int({"step": True}, "step", "index")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    funczero.checkpoint.errors.CorruptCheckpointError: ...: index.step must be int, got True
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from funczero.checkpoint.errors import CorruptCheckpointError
from funczero.checkpoint.format import INDEX_NAME, MAX_DIM, MAX_NDIM

__all__ = ["SHA256_RE", "Schema", "as_shape", "show"]

SHA256_RE = re.compile(r"[0-9a-f]{64}")
"""A SHA-256 digest as the index writes it (lowercase hex)."""


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short: hostile values must not flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def as_shape(value: Any) -> tuple[int, ...] | None:
    """``value`` as a shape, or None unless it is a list of at most MAX_NDIM sizes in int64."""
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        return None
    if not all(type(d) is int and 0 <= d <= MAX_DIM for d in value):
        return None
    return tuple(value) if math.prod(value) <= MAX_DIM else None


class Schema:
    """Checks values of the ``index.json`` of checkpoint ``where``."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, msg: str) -> CorruptCheckpointError:
        """The error to raise: ``malformed index.json: <msg>``."""
        return CorruptCheckpointError(f"malformed {INDEX_NAME}: {msg}", where=self.where)

    def get(
        self, obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], ctx: str
    ) -> Any:
        """``obj[key]``, required, of one of ``types`` (``ctx`` names ``obj`` in messages)."""
        if key not in obj:
            raise self.fail(f"{ctx}: required key {key!r} is missing")
        value = obj[key]
        allowed = types if isinstance(types, tuple) else (types,)
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            name = getattr(types, "__name__", types)
            raise self.fail(f"{ctx}.{key} must be {name}, got {show(value)}")
        return value

    def get_int(self, obj: Mapping[str, Any], key: str, ctx: str, lo: int = 0) -> int:
        """``obj[key]``, an integer from ``lo`` to int64's maximum."""
        value = self.get(obj, key, int, ctx)
        if not lo <= value <= MAX_DIM:
            raise self.fail(f"{ctx}.{key}={show(value)} must be between {lo} and {MAX_DIM}")
        return value
