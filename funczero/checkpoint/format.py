"""The on-disk format's vocabulary: names, versions, dtypes, tag rules and reading limits.

A checkpoint root holds one directory per tag and a ``latest`` file naming the newest one::

    <root>/latest                                   # the tag, one line, replaced atomically
    <root>/<tag>/index.json                         # everything except tensor bytes (JSON)
    <root>/<tag>/model-shard-RRRRR-of-WWWWW.safetensors   # params, master, buffers of rank R
    <root>/<tag>/optim-shard-RRRRR-of-WWWWW.safetensors   # optimizer state, step, rng of rank R

Everything read from disk is untrusted: tags pass :func:`validate_tag`, files are opened and
parsed by :mod:`funczero.checkpoint.safe_io` within the limits below (never unpickled). The
index schema and its validation are in :mod:`funczero.checkpoint.index`; the full description
is ``docs/checkpoint-format.md``.

Example:
    >>> validate_tag("step-100")
    'step-100'
    >>> shard_file_name("model", 0, 2)
    'model-shard-00000-of-00002.safetensors'
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch

from funczero.checkpoint.errors import ClientStateError, InvalidTagError

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
    "MAX_CLIENT_STATE_DEPTH",
    "MAX_DIM",
    "MAX_INDEX_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_LATEST_BYTES",
    "MAX_NDIM",
    "MAX_WORLD_SIZE",
    "PRECISIONS",
    "check_json",
    "deeper_than",
    "dtype_from_name",
    "dtype_name",
    "shard_file_name",
    "validate_tag",
]

FORMAT_NAME = "funczero.checkpoint"
FORMAT_VERSION = 2
"""Version 2 adds each shard file's record of its chunks (``__metadata__["tensors"]``); version
1 checkpoints are still read."""
INDEX_NAME = "index.json"
LATEST_NAME = "latest"
GROUPS = ("model", "optim")
"""File groups: ``model`` holds weights (params, master, buffers), ``optim`` everything else."""
LAYOUTS = ("shard", "replicated", "per_rank")
KINDS = ("param", "master", "moment", "optim", "buffer", "scalar", "rng")
PRECISIONS = ("fp32", "bf16", "fp16")

# Limits on what a reader accepts, checked before the data is used (a damaged or hostile
# checkpoint must fail fast with a clear error, never hang or exhaust memory).
MAX_INDEX_BYTES = 1 << 30
"""Largest ``index.json`` read (1 GiB: ~5 million chunks, e.g. 5,000 tensors at 1,000 ranks)."""
MAX_LATEST_BYTES = 4096
"""Largest ``latest`` file read (a tag is at most 200 characters)."""
MAX_JSON_DEPTH = 100
"""Deepest nesting of JSON read (index, shard headers)."""
MAX_CLIENT_STATE_DEPTH = 64
"""Deepest nesting of ``client_state`` and ``config`` saved (leaves room inside the index)."""
MAX_WORLD_SIZE = 99_999
"""Most ranks a checkpoint can have: file names carry the rank in five digits."""
MAX_NDIM = 64
"""Most dimensions of a tensor."""
MAX_DIM = (1 << 63) - 1
"""Largest size of a dimension, and of a tensor's element count (int64, as torch)."""

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
    if not 0 <= rank < world_size <= MAX_WORLD_SIZE:
        raise ValueError(
            f"rank {rank} of world size {world_size}: checkpoints hold 1 to {MAX_WORLD_SIZE} ranks"
        )
    return f"{group}-shard-{rank:05d}-of-{world_size:05d}.safetensors"


def deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON-like ``value`` nests more than ``limit`` levels (``[]`` is one level).

    Iterative, and it stops at ``limit``, so a value that contains itself answers ``True``.

    Example:
        >>> deeper_than({"a": [1, {"b": []}]}, 3), deeper_than({"a": [1, {"b": []}]}, 4)
        (True, False)
    """
    stack = [(value, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, dict):
            x = x.values()
        elif not isinstance(x, (list, tuple)):
            continue
        if depth > limit:
            return True
        stack.extend((v, depth + 1) for v in x if isinstance(v, (dict, list, tuple)))
    return False


def check_json(value: Any, what: str) -> Any:
    """Return ``value`` round-tripped through JSON, or raise naming the offending entry."""
    if deeper_than(value, MAX_CLIENT_STATE_DEPTH):
        raise ClientStateError(
            f"{what} is nested more than {MAX_CLIENT_STATE_DEPTH} levels deep (or contains "
            "itself); checkpoints refuse to read such JSON, so flatten it before saving"
        )

    def find(x: Any, path: str) -> str | None:
        if x is None or isinstance(x, (bool, str)):
            return None
        if isinstance(x, int):
            # Python refuses to parse integers of more than 4300 digits: they would not load.
            return None if x.bit_length() < 14_000 else f"{path} is an integer of over 4,000 digits"
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
