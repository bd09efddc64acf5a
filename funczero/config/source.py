"""Reading a config source, the world size, and the ZeRO block's legacy forms."""

from __future__ import annotations

import base64
import binascii
import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from funczero.config.errors import ConfigError, show, warn
from funczero.config.jsonc import loads
from funczero.config.keys import (
    DEPRECATED_ZERO,
    OFFLOAD_OPTIMIZER,
    OFFLOAD_PARAM,
    OPTIMIZER_PARAMS,
    SECTIONS,
    ZERO,
)
from funczero.config.schema import parse_block

__all__ = ["ELSEWHERE", "parse_zero", "read_source", "world_size_from"]

_BASE64 = re.compile(r"^[A-Za-z0-9_\-+/]+={0,2}$")


def read_source(source: Any) -> dict[str, Any]:
    """Return the config object from a dict (deep-copied), a JSON(-with-comments) file or base64."""
    if isinstance(source, Mapping):
        raw: Any = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            raw = loads(path.read_text(encoding="utf-8"), source=str(path))
        elif isinstance(source, str) and _BASE64.match(source):
            try:  # DeepSpeed also accepts url-safe base64-encoded JSON (launcher pass-through)
                raw = loads(base64.urlsafe_b64decode(source).decode("utf-8"), source="<base64>")
            except (binascii.Error, UnicodeDecodeError, ConfigError):
                raise ConfigError(
                    f"config '{source}' is neither an existing file (cwd: {os.getcwd()}) nor "
                    "base64-encoded JSON"
                ) from None
        else:
            raise ConfigError(f"config file '{source}' does not exist (cwd: {os.getcwd()})")
    else:
        raise ConfigError(
            f"config source: expected a dict, a file path or base64 JSON, got "
            f"{type(source).__name__}"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"config: the top level must be a JSON object, got {show(raw)}")
    return raw


def world_size_from(world_size: int | None) -> tuple[int, str]:
    """Return ``(data-parallel size, where it came from)``: the argument, $WORLD_SIZE, or 1."""
    if world_size is not None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world_size: expected an integer >= 1, got {world_size!r}")
        return world_size, "as given to Config.load"
    env = os.environ.get("WORLD_SIZE")
    if env is None:
        return 1, "the default: WORLD_SIZE is not set"
    try:
        w = int(env)
    except ValueError:
        w = 0
    if w < 1:
        raise ConfigError(f"WORLD_SIZE={env!r} in the environment is not an integer >= 1")
    return w, f"from WORLD_SIZE={env} in the environment"


def _elsewhere() -> dict[str, str]:
    """Key name -> the one block it belongs to, for "belongs in" hints (unique names only)."""
    homes: dict[str, set[str]] = {}
    for prefix, table in SECTIONS.items():
        for name in table:
            homes.setdefault(name, set()).add(prefix)
    for params in OPTIMIZER_PARAMS.values():
        for name in params:
            homes.setdefault(name, set()).add("optimizer.params")
    return {name: next(iter(p)) for name, p in homes.items() if len(p) == 1}


ELSEWHERE = _elsewhere()


def parse_zero(value: Any, allgather_size: int, errors: list[str]) -> dict[str, Any]:
    """Validate ``zero_optimization``, mapping its legacy boolean form and deprecated keys."""
    if isinstance(value, bool):
        warn(
            f'"zero_optimization": {show(value)} is DeepSpeed\'s deprecated form; write '
            f'"zero_optimization": {{"stage": {int(value)}}}'
        )
        value = {"stage": 1, "allgather_bucket_size": allgather_size} if value else {}
    raw = dict(value)
    for old, new in DEPRECATED_ZERO.items():
        if old not in raw:
            continue
        v = raw.pop(old)
        path = f"zero_optimization.{old}"
        if old in ("cpu_offload", "cpu_offload_param") and v:
            errors.append(
                f"{path}={show(v)} (deprecated name of {new}) asks for CPU offload, which "
                "funczero does not implement; remove the key"
            )
        elif old == "stage3_gather_fp16_weights_on_model_save":
            if new in raw or "gather_16bit_weights_on_model_save" in raw:
                errors.append(f"{path} and its replacement {new} are both given; keep only {new}")
            else:
                raw[new] = v
                warn(f"{path} is deprecated; renamed to zero_optimization.{new}")
        else:
            warn(f"{path} is deprecated (replaced by {new}) and has no effect in funczero")
    zero = parse_block(raw, "zero_optimization", ZERO, errors, ELSEWHERE)
    for name, table in (("offload_param", OFFLOAD_PARAM), ("offload_optimizer", OFFLOAD_OPTIMIZER)):
        if zero[name] is not None:
            parse_block(zero[name], f"zero_optimization.{name}", table, errors, ELSEWHERE)
    return zero
