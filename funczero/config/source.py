"""Reading a config source (a dict, a JSON file or base64) and the data-parallel world size.

Every source goes through the same bounds before any key is looked at, so that no input, however
hostile, ends in anything but a :class:`ConfigError` or takes long to reject: files of at most
:data:`MAX_BYTES` bytes, valid UTF-8, nesting at most :data:`MAX_DEPTH` deep, at most
:data:`MAX_VALUES` values, object keys that are strings, and only JSON values (no NaN or
Infinity: a learning rate of Infinity trains nothing).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from funczero.config.checks import INT64_MAX
from funczero.config.errors import ConfigError, join_path, key_text, show
from funczero.config.jsonc import MAX_CHARS, loads

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "read_source", "world_size_from"]

MAX_BYTES = MAX_CHARS
"""Largest accepted config file (256 KiB; DeepSpeed configs are a few KB)."""

MAX_DEPTH = 32
"""Deepest accepted nesting of objects and arrays (a DeepSpeed config nests 4 deep)."""

MAX_VALUES = 10_000
"""Most values (objects, arrays and scalars together) a config may hold (a DeepSpeed config
holds about a hundred)."""

_BASE64 = re.compile(r"^[A-Za-z0-9_\-+/]+={0,2}$")
_MAX_PROBLEMS = 100  # non-finite values reported before the walk stops collecting them


def read_source(source: Any) -> dict[str, Any]:
    """Return the config object from a dict, a JSON(-with-comments) file or base64 JSON.

    The result is a fresh copy made of plain ``dict``, ``list``, ``str``, ``int``, ``float``,
    ``bool`` and ``None`` (tuples become lists), which the caller may keep.

    Raises:
        ConfigError: the source cannot be read, is not a JSON object, or breaks a bound above.

    Example:
        >>> read_source({"train_batch_size": 8, "optimizer": {"params": {"betas": (0.9, 0.95)}}})
        {'train_batch_size': 8, 'optimizer': {'params': {'betas': [0.9, 0.95]}}}
        >>> read_source({"gradient_clipping": float("nan")})
        Traceback (most recent call last):
        ...
        funczero.config.errors.ConfigError: gradient_clipping: NaN is not a finite number; \
give a finite value
    """
    if isinstance(source, Mapping):
        raw: Any = source
    elif isinstance(source, (str, os.PathLike)):
        raw = _read_path_or_base64(source)
    else:
        raise ConfigError(
            f"config source: expected a dict, a file path or base64 JSON, got "
            f"{type(source).__name__}"
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: the top level must be a JSON object, got {show(raw)}")
    problems: list[str] = []
    copy = _plain_copy(raw, "", 1, [0], problems)
    if problems:
        raise ConfigError(problems)
    return copy


def _read_path_or_base64(source: str | os.PathLike[str]) -> Any:
    path = Path(source)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        exists = False
    if exists:
        return loads(_read_text(path), source=str(path))
    if isinstance(source, str) and len(source) <= MAX_BYTES * 4 // 3 + 4 and _BASE64.match(source):
        try:  # DeepSpeed also accepts url-safe base64-encoded JSON (launcher pass-through)
            text = base64.urlsafe_b64decode(source).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            text = None
        if text is not None:
            try:
                return loads(text, source="<base64>")
            except ConfigError:
                pass
        raise ConfigError(
            f"config '{key_text(source)}' is neither an existing file (cwd: {os.getcwd()}) nor "
            "base64-encoded JSON"
        )
    name = os.fspath(source)
    if not isinstance(name, str) or not name.isprintable() or len(name) > 4096:
        name = key_text(name) if isinstance(name, str) else repr(name)[:100]
    raise ConfigError(f"config file '{name}' does not exist (cwd: {os.getcwd()})")


def _read_text(path: Path) -> str:
    """Read a regular file of at most MAX_BYTES as UTF-8, without ever blocking or growing."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then rejects it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be opened: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"config file '{path}' is not a regular file")
        if info.st_size > MAX_BYTES:
            raise ConfigError(
                f"config file '{path}' has {info.st_size} bytes; a config is at most "
                f"{MAX_BYTES} bytes (DeepSpeed configs are a few KB): is this the right file?"
            )
        data = os.read(fd, MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:  # it grew after fstat
        raise ConfigError(f"config file '{path}' has more than {MAX_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")  # -sig: a byte-order mark from a Windows editor is fine
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text: byte {data[e.start]:#04x} at line {line} "
            f"(byte offset {e.start}) is invalid; save the file as UTF-8"
        ) from None


_SCALARS = (str, bool, int, float, type(None))


def _plain_copy(value: Any, path: str, depth: int, count: list[int], problems: list[str]) -> Any:
    """Copy ``value`` as plain JSON data, checking the bounds (recursion is bounded by depth)."""
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise ConfigError(
            f"the config holds more than {MAX_VALUES} values (a DeepSpeed config holds about "
            "a hundred): is this the right file?"
        )
    where = path or "the top level"
    if isinstance(value, Mapping) or isinstance(value, (list, tuple)):
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{where}: objects and arrays nest deeper than {MAX_DEPTH} levels "
                "(a config nests a few levels deep; a dict that contains itself never ends)"
            )
        if isinstance(value, (list, tuple)):
            return [
                _plain_copy(v, f"{path}[{i}]", depth + 1, count, problems)
                for i, v in enumerate(value)
            ]
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: key {show(k)} is a {type(k).__name__}, not a string")
            out[k] = _plain_copy(v, join_path(path, k), depth + 1, count, problems)
        return out
    if not isinstance(value, _SCALARS):
        raise ConfigError(
            f"{where}: a {type(value).__name__} is not a JSON value; give a number, a string, "
            "true/false, null, a list or a dict"
        )
    if isinstance(value, float) and not math.isfinite(value) and len(problems) < _MAX_PROBLEMS:
        problems.append(f"{where}: {show(value)} is not a finite number; give a finite value")
    return value


def world_size_from(world_size: int | None) -> tuple[int, str]:
    """Return ``(data-parallel size, where it came from)``: the argument, $WORLD_SIZE, or 1.

    Example:
        >>> world_size_from(4)
        (4, 'as given to Config.load')
    """
    if world_size is not None:
        bad = isinstance(world_size, bool) or not isinstance(world_size, int)
        if bad or not 1 <= world_size <= INT64_MAX:
            raise ConfigError(f"world_size: expected an integer >= 1, got {show(world_size)}")
        return world_size, "as given to Config.load"
    env = os.environ.get("WORLD_SIZE")
    if env is None:
        return 1, "the default: WORLD_SIZE is not set"
    digits = env.strip()
    w = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 19 else 0
    if not 1 <= w <= INT64_MAX:
        raise ConfigError(
            f"WORLD_SIZE={key_text(env)!r} in the environment is not an integer >= 1"
        )
    return w, f"from WORLD_SIZE={env} in the environment"
