"""The on-disk format's vocabulary: names, versions, dtypes, tag rules and path safety.

A checkpoint root holds one directory per tag and a ``latest`` file naming the newest one::

    <root>/latest                                   # the tag, one line, replaced atomically
    <root>/<tag>/index.json                         # everything except tensor bytes (JSON)
    <root>/<tag>/model-shard-RRRRR-of-WWWWW.safetensors   # params, master, buffers of rank R
    <root>/<tag>/optim-shard-RRRRR-of-WWWWW.safetensors   # optimizer state, step, rng of rank R

Tags and file names read from disk pass :func:`validate_tag` and :func:`safe_child` before
use; JSON is parsed strictly by :func:`loads_json` (never unpickled). The index schema and its
validation are in :mod:`funczero.checkpoint.index`; the full description is
``docs/checkpoint-format.md``.

Example:
    >>> validate_tag("step-100")
    'step-100'
    >>> shard_file_name("model", 0, 2)
    'model-shard-00000-of-00002.safetensors'
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from funczero.checkpoint.errors import (
    ClientStateError,
    InvalidTagError,
    UnsafePathError,
)

__all__ = [
    "DTYPE_NAMES",
    "FILE_RE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GROUPS",
    "INDEX_NAME",
    "KINDS",
    "LATEST_NAME",
    "LAYOUTS",
    "PRECISIONS",
    "check_json",
    "dtype_from_name",
    "dtype_name",
    "loads_json",
    "safe_child",
    "shard_file_name",
    "validate_tag",
]

FORMAT_NAME = "funczero.checkpoint"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
LATEST_NAME = "latest"
GROUPS = ("model", "optim")
"""File groups: ``model`` holds weights (params, master, buffers), ``optim`` everything else."""
LAYOUTS = ("shard", "replicated", "per_rank")
KINDS = ("param", "master", "moment", "optim", "buffer", "scalar", "rng")
PRECISIONS = ("fp32", "bf16", "fp16")

_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,199}")
FILE_RE = re.compile(r"(model|optim)-shard-(\d{5})-of-(\d{5})\.safetensors")

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
DTYPE_NAMES = frozenset(_DTYPES)
"""The dtype names an index may use."""


def dtype_name(dtype: torch.dtype) -> str:
    """The index's name for ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TypeError(
            f"dtype {dtype} cannot be stored in a checkpoint; supported: {sorted(_DTYPES)}"
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises ``KeyError`` for unknown names."""
    return _DTYPES[name]


def validate_tag(tag: object) -> str:
    """Return ``tag`` as a string if it is a safe directory name, else raise.

    A tag is 1-200 characters of letters, digits and ``_ . + = @ -``, does not start with ``.``
    or ``-``, contains no ``..`` and is not ``latest`` (the pointer file's name).

    Example:
        >>> validate_tag(100)
        '100'
    """
    text = str(tag)
    problem = None
    if not text:
        problem = "it is empty"
    elif "/" in text or "\\" in text:
        problem = "it contains a path separator"
    elif ".." in text:
        problem = "it contains '..'"
    elif text == LATEST_NAME:
        problem = "'latest' is the name of the pointer file"
    elif not _TAG_RE.fullmatch(text):
        problem = (
            "only letters, digits and '_.+=@-' are allowed, it must not start with '.' or '-', "
            "and it must be at most 200 characters"
        )
    if problem:
        raise InvalidTagError(
            f"invalid checkpoint tag {text!r}: {problem}; use a plain name such as 'step-100'"
        )
    return text


def shard_file_name(group: str, rank: int, world_size: int) -> str:
    """The file of ``group`` (``model`` or ``optim``) written by ``rank`` of ``world_size``."""
    return f"{group}-shard-{rank:05d}-of-{world_size:05d}.safetensors"


def safe_child(directory: Path, name: str) -> Path:
    """Return ``directory / name`` after checking that it cannot escape ``directory``.

    ``name`` must be a plain file name (no separators, no ``..``, not absolute, not hidden), and
    its real path (symlinks resolved) must lie inside ``directory``'s real path.
    """
    bad = (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
        or os.path.isabs(name)
    )
    if bad:
        raise UnsafePathError(
            f"file name {name!r} in the index is not a plain file name inside the checkpoint "
            "directory; refusing to open it",
            where=str(directory),
        )
    path = directory / name
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise UnsafePathError(
            f"file {name!r} resolves to {real}, outside the checkpoint directory {root} "
            "(a symlink?); refusing to open it",
            where=str(directory),
        )
    return path


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def loads_json(text: str | bytes) -> Any:
    """Parse JSON strictly: duplicate keys and NaN/Infinity are errors."""

    def constant(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=constant)


def check_json(value: Any, what: str) -> Any:
    """Return ``value`` round-tripped through JSON, or raise naming the offending entry."""

    def find(x: Any, path: str) -> str | None:
        if x is None or isinstance(x, (bool, int, str)):
            return None
        if isinstance(x, float):
            return None if math.isfinite(x) else f"{path} = {x!r} (not finite)"
        if isinstance(x, (list, tuple)):
            return next((p for i, v in enumerate(x) if (p := find(v, f"{path}[{i}]"))), None)
        if isinstance(x, dict):
            for k, v in x.items():
                if not isinstance(k, str):
                    return f"{path} has a key {k!r} of type {type(k).__name__} (keys must be str)"
                if p := find(v, f"{path}[{k!r}]"):
                    return p
            return None
        return f"{path} is a {type(x).__name__}"

    bad = find(value, what)
    if bad:
        raise ClientStateError(
            f"{what} must be JSON-serialisable (dict/list/str/int/float/bool/None): {bad}; "
            "convert it (tensors with .tolist(), numbers with int()/float()) before saving"
        )
    return json.loads(json.dumps(value, allow_nan=False))
