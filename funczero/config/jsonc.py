"""JSON with comments: the relaxed JSON that DeepSpeed's hjson loader accepts in practice.

DeepSpeed parses config files with hjson, so configs found in the wild carry ``//`` and
``/* */`` comments, ``#`` comments and trailing commas. We accept exactly those four
relaxations (not hjson's unquoted keys or strings) and keep line and column numbers intact so
JSON syntax errors point at the right place in the original file.
"""

from __future__ import annotations

import json
import re
from typing import Any

from funczero.config.errors import ConfigError, join_path

__all__ = ["MAX_CHARS", "MAX_DIGITS", "loads", "strip_comments"]

MAX_CHARS = 256 * 1024
"""Longest accepted document (DeepSpeed configs are a few KB); bounds the time to reject one."""

MAX_DIGITS = 100
"""Longest accepted integer: no config value needs more, and converting one of thousands of digits
takes time quadratic in its length (Python's own limit may be switched off)."""

_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"?'  # a JSON string; json reports an unterminated one
_COMMENTS = re.compile(
    rf"(?P<string>{_STRING}) | (?P<comment>(?://|\#)[^\n]* | /\*.*?\*/) | (?P<open>/\*)",
    re.VERBOSE | re.DOTALL,
)
_TRAILING_COMMAS = re.compile(rf"(?P<string>{_STRING}) | (?P<comma>,)(?=\s*[}}\]])", re.VERBOSE)
_MAYBE_TRAILING = re.compile(r",\s*[}\]]")
_NOT_NEWLINE = re.compile(r"[^\n]")


def strip_comments(text: str) -> str:
    """Blank out comments and trailing commas outside strings, keeping every line and column.

    Only strings, comments and trailing commas cost a step of Python, and text without comment
    markers or trailing commas is returned as it is.

    Args:
        text: JSON text that may contain ``//``, ``/* */`` and ``#`` comments and trailing commas.

    Returns:
        Text of the same length where comments and trailing commas are replaced by spaces
        (newlines are kept), ready for :func:`json.loads`.

    Raises:
        ConfigError: a ``/*`` comment is never closed.

    Example:
        >>> strip_comments('{"a": "x//y", // note\\n "b": [1, 2,], }')
        '{"a": "x//y",        \\n "b": [1, 2 ]  }'
    """
    if "/" in text or "#" in text:
        text = _blank(text, _COMMENTS)
    if _MAYBE_TRAILING.search(text):
        text = _blank(text, _TRAILING_COMMAS)
    return text


def _blank(text: str, pattern: re.Pattern[str]) -> str:
    """Replace every match that is not a string by spaces (keeping newlines)."""
    pieces: list[str] = []
    last = 0
    for m in pattern.finditer(text):
        group = m.lastgroup
        if group == "string":
            continue
        if group == "open":
            line = text.count("\n", 0, m.start()) + 1
            raise ConfigError(f"unterminated /* comment starting at line {line}")
        pieces += [text[last:m.start()], _NOT_NEWLINE.sub(" ", m.group())]
        last = m.end()
    pieces.append(text[last:])
    return "".join(pieces)


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise ConfigError(
            f"an integer of {len(digits.lstrip('-'))} digits ({digits[:20]}...); integers in a "
            f"config have at most {MAX_DIGITS} digits"
        )
    return int(digits)


class _Object(dict):  # type: ignore[type-arg]
    """A parsed JSON object that remembers keys it saw more than once."""

    duplicates: list[str]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj and key not in obj.duplicates:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _plain(node: Any, path: str, duplicates: list[str]) -> Any:
    """Convert hook objects back to plain dicts, collecting full paths of duplicate keys."""
    if isinstance(node, dict):
        for key in getattr(node, "duplicates", ()):
            duplicates.append(join_path(path, key))
        return {k: _plain(v, join_path(path, k), duplicates) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v, f"{path}[{i}]", duplicates) for i, v in enumerate(node)]
    return node


def loads(text: str, *, source: str = "<string>") -> Any:
    """Parse JSON-with-comments text, rejecting duplicate keys.

    Args:
        text: the document.
        source: a name for messages (usually the file path).

    Returns:
        The parsed value, with plain ``dict``/``list`` containers.

    Raises:
        ConfigError: a syntax error (with line, column and the offending line) or a duplicate key
            (with its full dotted path).

    Example:
        >>> loads('{"fp16": {"enabled": true /* on */}}')
        {'fp16': {'enabled': True}}
    """
    if len(text) > MAX_CHARS:
        raise ConfigError(
            f"{source}: {len(text)} characters; a config is at most {MAX_CHARS} (DeepSpeed "
            "configs are a few KB): is this the right file?"
        )
    cleaned = strip_comments(text)
    try:
        parsed = json.loads(cleaned, object_pairs_hook=_pairs_hook, parse_int=_parse_int)
        duplicates: list[str] = []
        result = _plain(parsed, "", duplicates)
    except json.JSONDecodeError as e:
        lines = text.splitlines() or [""]
        bad = lines[min(e.lineno, len(lines)) - 1]
        if len(bad) > 200:  # a minified file is one long line: show the part around the column
            bad, column = bad[max(0, e.colno - 60): e.colno + 60], min(e.colno, 60)
        else:
            column = e.colno
        raise ConfigError(
            f"{source}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}\n"
            f"    {bad}\n    {' ' * (column - 1)}^"
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{source}: objects and arrays nest hundreds of levels deep; a config nests a few"
        ) from None
    if duplicates:
        raise ConfigError(
            [
                f"{source}: duplicate key '{d}' (JSON keeps only the last value silently; "
                "remove one of them)"
                for d in duplicates
            ]
        )
    return result
