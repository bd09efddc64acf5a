"""The schema machinery: what one accepted key is (:class:`Key`) and how a block is parsed.

The tables themselves live in :mod:`funczero.config.keys`; this module only knows how to
apply one table to one JSON object: unknown keys, aliases, ``"auto"``, type checks, keys that
are accepted only at their default, and keys that are accepted but have no effect.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from funczero.config.checks import Check
from funczero.config.errors import ConfigError, did_you_mean, join_path, show, warn

__all__ = ["AUTO", "Auto", "Key", "Status", "parse_block", "unknown_key"]


class Status(enum.Enum):
    """What funczero does with an accepted key."""

    USED = "used"  # the value changes what funczero does
    IGNORED = "ignored"  # accepted, has no effect (a non-default value warns, see Key.warn_if_set)
    DEFAULT_ONLY = "default only"  # a feature funczero lacks: only its default value is accepted


class Auto(enum.Enum):
    """How the HF-Trainer value ``"auto"`` is resolved for a key."""

    NO = "not accepted"  # "auto" is an ordinary bad value (DeepSpeed never accepted it here)
    DEFAULT = "default"  # "auto" means the default, as DeepSpeed does inside its pydantic blocks
    ERROR = "error"  # only the HF Trainer's values fill it (Config.load's auto=), else an error
    COMPUTED = "computed"  # derived from other keys by dedicated code (batch sizes, warmup_max_lr)


class _AutoSentinel:
    def __repr__(self) -> str:
        return "AUTO"


AUTO: Any = _AutoSentinel()
"""Marks a value given as ``"auto"`` whose resolution is left to dedicated code (Auto.COMPUTED)."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One accepted config key.

    Attributes:
        check: validates and normalises the value.
        default: funczero's default (what an absent key means).
        doc: what the key does (``USED``) or why it has no effect / is limited (other statuses).
        status: see :class:`Status`.
        ds: DeepSpeed's default when it differs from ours, as text for the docs; ``None`` if equal.
        auto: how ``"auto"`` is resolved.
        hint: for ``Auto.ERROR``, where the HF Trainer would take the value from.
        alias: a second accepted spelling (DeepSpeed's ``populate_by_name`` aliases).
        disabled_only: a foreign feature block accepted only with ``"enabled": false``.
        warn_if_set: for ``IGNORED`` keys, warn when the value is not the default. False for keys
            that nearly every DeepSpeed config sets and whose value training loops read from the
            config themselves (``steps_per_print``), where a warning would be noise.
    """

    check: Check
    default: Any
    doc: str
    status: Status = Status.USED
    ds: str | None = None
    auto: Auto = Auto.NO
    hint: str = ""
    alias: str | None = None
    disabled_only: bool = False
    warn_if_set: bool = True


def unknown_key(
    path: str,
    given: str,
    candidates: list[str],
    elsewhere: Mapping[str, str],
    *,
    suggest: bool = True,
) -> str:
    """Phrase the error for an unknown key, with the closest valid key or its right block.

    ``suggest=False`` skips the (costly) search for a close match, for the hundredth unknown key.
    """
    msg = f"unknown key '{path}'"
    hint = did_you_mean(given, candidates) if suggest else ""
    if hint:
        return msg + hint
    if given in elsewhere:
        return f"{msg}; '{given}' belongs in the '{elsewhere[given] or 'top level'}' block"
    if len(candidates) <= 14:
        return f"{msg}; valid keys here: {', '.join(sorted(candidates))}"
    return f"{msg} (see docs/config.md for the keys accepted here)"


_SUGGEST_LIMIT = 100  # past this many problems, unknown keys get no "did you mean" (it is slow)


def _resolve(key: Key, value: Any, path: str) -> Any:
    if isinstance(value, str) and value == "auto":
        if key.auto is Auto.DEFAULT:
            return key.default
        if key.auto is Auto.COMPUTED:
            return AUTO
        if key.auto is Auto.ERROR:
            raise ConfigError(
                f'{path} is "auto", a value only the HuggingFace Trainer fills in ({key.hint}); '
                f"pass it with Config.load(..., auto=...) or set {key.check.describe}"
            )
    if key.disabled_only:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {show(value)}")
        if value.get("enabled", False) is not False:
            raise ConfigError(
                f"{path}.enabled={show(value.get('enabled'))}: {key.doc}; "
                f"remove the '{path}' block or set \"enabled\": false"
            )
        return None
    out = key.check(value, path)
    if key.status is Status.DEFAULT_ONLY and out != key.default:
        raise ConfigError(
            f"{path}={show(value)} is not supported by funczero ({key.doc}); "
            f"remove the key or set it to {show(key.default)}"
        )
    ignored = key.status is Status.IGNORED and key.warn_if_set
    if ignored and out != key.default and key.default is not None:
        warn(f"{path}={show(value)} has no effect in funczero: {key.doc}")
    return out


def parse_block(
    raw: Mapping[str, Any],
    prefix: str,
    keys: Mapping[str, Key],
    errors: list[str],
    elsewhere: Mapping[str, str] = {},  # noqa: B006 - read-only
) -> dict[str, Any]:
    """Validate one JSON object against a table and return every key's value, defaults filled.

    Args:
        raw: the object as given.
        prefix: its dotted path ('' for the top level), used in messages.
        keys: the table for this block.
        errors: problems are appended here (all keys are checked before anything is raised).
        elsewhere: key name -> the block it belongs to, for "belongs in" hints.

    Returns:
        ``{canonical key name: value}`` for every key of the table. Alias spellings are folded into
        the canonical name; values that failed their check fall back to the default.
    """
    by_alias = {k.alias: name for name, k in keys.items() if k.alias}
    values: dict[str, Any] = {}
    seen_as: dict[str, str] = {}
    for given, value in raw.items():
        name = by_alias.get(given, given)
        path = join_path(prefix, given)
        key = keys.get(name)
        if key is None:
            suggest = len(errors) < _SUGGEST_LIMIT
            errors.append(unknown_key(path, given, [*keys, *by_alias], elsewhere, suggest=suggest))
            continue
        if name in seen_as:
            errors.append(
                f"'{join_path(prefix, seen_as[name])}' and '{path}' are the same setting; keep one"
            )
            continue
        seen_as[name] = given
        try:
            values[name] = _resolve(key, value, path)
        except ConfigError as e:
            errors.extend(e.problems)
    for name, key in keys.items():
        values.setdefault(name, key.default)
    return values
