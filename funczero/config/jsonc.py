"""JSON with comments: the relaxed JSON that DeepSpeed's hjson loader accepts in practice.

DeepSpeed parses config files with hjson, so configs found in the wild carry ``//`` and
``/* */`` comments, ``#`` comments and trailing commas. We accept exactly those four
relaxations (not hjson's unquoted keys or strings) and keep line and column numbers intact so
JSON syntax errors point at the right place in the original file.
"""

from __future__ import annotations

import json
from typing import Any

from funczero.config.errors import ConfigError

__all__ = ["loads", "strip_comments"]


def strip_comments(text: str) -> str:
    """Blank out comments and trailing commas outside strings, keeping every line and column.

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
    out = list(text)
    i, n = 0, len(text)
    pending_comma = -1  # index of a comma that is trailing if the next token closes a container
    while i < n:
        c = text[i]
        if c == '"':
            pending_comma = -1
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if c == "/" and text.startswith("//", i) or c == "#":
            end = text.find("\n", i)
            end = n if end == -1 else end
            out[i:end] = " " * (end - i)
            i = end
            continue
        if c == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                line = text.count("\n", 0, i) + 1
                raise ConfigError(f"unterminated /* comment starting at line {line}")
            for j in range(i, end + 2):
                if out[j] != "\n":
                    out[j] = " "
            i = end + 2
            continue
        if c in "}]" and pending_comma >= 0:
            out[pending_comma] = " "
        if not c.isspace():
            pending_comma = i if c == "," else -1
        i += 1
    return "".join(out)


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
            duplicates.append(f"{path}.{key}" if path else key)
        return {k: _plain(v, f"{path}.{k}" if path else k, duplicates) for k, v in node.items()}
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
    cleaned = strip_comments(text)
    try:
        parsed = json.loads(cleaned, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as e:
        lines = text.splitlines() or [""]
        bad = lines[min(e.lineno, len(lines)) - 1]
        raise ConfigError(
            f"{source}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}\n"
            f"    {bad}\n    {' ' * (e.colno - 1)}^"
        ) from None
    duplicates: list[str] = []
    result = _plain(parsed, "", duplicates)
    if duplicates:
        raise ConfigError(
            [
                f"{source}: duplicate key '{d}' (JSON keeps only the last value silently; "
                "remove one of them)"
                for d in duplicates
            ]
        )
    return result
