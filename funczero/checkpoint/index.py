"""``index.json``: its parsed form and the validation every reader goes through.

The index is plain JSON with a fixed schema (see ``docs/checkpoint-format.md``). Before any
value of it is used, :func:`parse_index` checks types, that file names are plain names of the
``<model|optim>-shard-RRRRR-of-WWWWW.safetensors`` form that resolve inside the tag directory,
that chunks tile each tensor exactly, and that aliases point at stored tensors.

Example:
    >>> import tempfile
    >>> from funczero.checkpoint import save
    >>> from funczero.testing.states import toy_state
    >>> index = read_index(save(tempfile.mkdtemp(), toy_state()))
    >>> index.tensors["master/w"].shape, index.world_size
    ((4, 4), 1)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from funczero.checkpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from funczero.checkpoint.format import (
    DTYPE_NAMES,
    FILE_RE,
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUPS,
    INDEX_NAME,
    KINDS,
    LAYOUTS,
    PRECISIONS,
    dtype_from_name,
    loads_json,
    safe_child,
    shard_file_name,
    validate_tag,
)

__all__ = ["Chunk", "FileEntry", "Index", "TensorEntry", "parse_index", "read_index"]

_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Elements ``[start, stop)`` of a tensor's flattened values, stored 1-D under ``key``.

    For ``per_rank`` tensors each chunk is one rank's whole tensor and ``rank`` says whose.
    """

    file: str
    key: str
    start: int
    stop: int
    sha256: str
    rank: int | None = None

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "key": self.key,
            "start": self.start,
            "stop": self.stop,
            "sha256": self.sha256,
        }
        if self.rank is not None:
            out["rank"] = self.rank
        return out


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One leaf of the saved state.

    Attributes:
        path: leaf path (``params/blocks.0.attn.qkv.weight``).
        group: ``model`` or ``optim`` (which files hold its chunks).
        kind: ``param``, ``master``, ``moment``, ``optim``, ``buffer``, ``scalar`` or ``rng``.
        layout: how the saving state held it: ``shard``, ``replicated`` or ``per_rank``.
        param: the parameter whose shard layout it follows (``shard`` layout), else ``None``.
        shape: global shape (``per_rank``: each rank's shape).
        dtype: dtype name (``float32``...).
        chunks: the stored pieces (see :class:`Chunk`); empty for aliases.
        alias_of: path of the entry whose values this leaf shares (the same tensor object in
            the saved state, e.g. ``params/w`` -> ``master/w`` at stage 3), else ``None``.
    """

    path: str
    group: str
    kind: str
    layout: str
    param: str | None
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[Chunk, ...] = ()
    alias_of: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "group": self.group,
            "kind": self.kind,
            "layout": self.layout,
            "param": self.param,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }
        if self.alias_of is not None:
            out["alias_of"] = self.alias_of
        else:
            out["chunks"] = [c.to_json() for c in self.chunks]
        return out


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """A shard file: who wrote it, its size and its checksum (see ``docs/checkpoint-format.md``)."""

    name: str
    group: str
    rank: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "rank": self.rank, "bytes": self.bytes, "sha256": self.sha256}


@dataclasses.dataclass(frozen=True)
class Index:
    """A parsed, validated ``index.json``; ``raw`` keeps the JSON object as read."""

    raw: Mapping[str, Any]
    tag: str
    checkpoint_id: str
    step: int
    world_size: int
    stage: int
    precision: str
    tensors: Mapping[str, TensorEntry]
    files: Mapping[str, FileEntry]

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.raw["params"]["shapes"].items()}

    @property
    def aliases(self) -> dict[str, str]:
        """Tied parameter aliases: alias FQN -> canonical FQN (module-level ties)."""
        return dict(self.raw["params"].get("aliases") or {})

    @property
    def client_state(self) -> Any:
        return self.raw.get("client_state")

    def resolve(self, entry: TensorEntry) -> TensorEntry:
        """The entry holding ``entry``'s values (itself unless it is an alias)."""
        return self.tensors[entry.alias_of] if entry.alias_of else entry


def _fail(where: str, msg: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"malformed {INDEX_NAME}: {msg}", where=where)


def _get(
    obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str, ctx: str
) -> Any:
    if key not in obj:
        raise _fail(where, f"{ctx}: required key {key!r} is missing")
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _fail(where, f"{ctx}.{key} must be {types}, got {value!r}")
    if not isinstance(value, types):
        raise _fail(
            where, f"{ctx}.{key} must be {getattr(types, '__name__', types)}, got {value!r}"
        )
    return value


def _int(obj: Mapping[str, Any], key: str, where: str, ctx: str, lo: int = 0) -> int:
    value = _get(obj, key, int, where, ctx)
    if value < lo:
        raise _fail(where, f"{ctx}.{key}={value} must be >= {lo}")
    return value


def parse_index(raw: Any, tag_dir: Path) -> Index:
    """Validate the JSON object of an ``index.json`` and return it as an :class:`Index`."""
    where = str(tag_dir)
    if not isinstance(raw, dict):
        raise _fail(where, f"top level must be an object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT_NAME:
        raise _fail(where, f"format is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
    version = _int(raw, "format_version", where, "index", lo=1)
    if version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"format_version {version} is newer than this funczero understands "
            f"({FORMAT_VERSION}); upgrade funczero to read it",
            where=where,
        )
    tag = validate_tag(_get(raw, "tag", str, where, "index"))
    ckpt_id = _get(raw, "checkpoint_id", str, where, "index")
    step = _int(raw, "step", where, "index")
    world = _int(raw, "world_size", where, "index", lo=1)
    stage = _int(raw, "stage", where, "index")
    if stage > 3:
        raise _fail(where, f"stage={stage} must be 0-3")
    precision = _get(raw, "precision", str, where, "index")
    if precision not in PRECISIONS:
        raise _fail(where, f"precision={precision!r} must be one of {PRECISIONS}")
    params = _get(raw, "params", dict, where, "index")
    shapes = _get(params, "shapes", dict, where, "index.params")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(where, f"params.shapes[{name!r}]={shape!r} is not a list of sizes")
    aliases = params.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise _fail(where, "params.aliases must map alias names to canonical names")

    files: dict[str, FileEntry] = {}
    for name, f in _get(raw, "files", dict, where, "index").items():
        safe_child(tag_dir, name)
        m = FILE_RE.fullmatch(name)
        if not m or int(m.group(3)) != world or int(m.group(2)) >= world:
            raise _fail(
                where,
                f"file name {name!r} is not '<model|optim>-shard-RRRRR-of-{world:05d}.safetensors'",
            )
        if not isinstance(f, dict):
            raise _fail(where, f"files[{name!r}] must be an object")
        sha = _get(f, "sha256", str, where, f"files[{name!r}]")
        if not _SHA_RE.fullmatch(sha):
            raise _fail(where, f"files[{name!r}].sha256 is not a sha256 hex digest")
        files[name] = FileEntry(
            name=name,
            group=m.group(1),
            rank=int(m.group(2)),
            bytes=_int(f, "bytes", where, f"files[{name!r}]"),
            sha256=sha,
        )
    expected = {shard_file_name(g, r, world) for g in GROUPS for r in range(world)}
    if set(files) != expected:
        missing = sorted(expected - set(files))
        raise _fail(where, f"files must list every rank's shard files; missing {missing[:4]}")

    tensors: dict[str, TensorEntry] = {}
    for path, t in _get(raw, "tensors", dict, where, "index").items():
        tensors[path] = _parse_tensor(path, t, files, world, where)
    for entry in tensors.values():
        if entry.alias_of is not None:
            target = tensors.get(entry.alias_of)
            if target is None or target.alias_of is not None or target.numel != entry.numel:
                raise _fail(
                    where,
                    f"tensor {entry.path!r} is an alias of {entry.alias_of!r}, which is not a "
                    "stored tensor of the same size",
                )
    return Index(
        raw=raw,
        tag=tag,
        checkpoint_id=ckpt_id,
        step=step,
        world_size=world,
        stage=stage,
        precision=precision,
        tensors=tensors,
        files=files,
    )


def _parse_tensor(
    path: str, t: Any, files: Mapping[str, FileEntry], world: int, where: str
) -> TensorEntry:
    ctx = f"tensors[{path!r}]"
    if not isinstance(t, dict):
        raise _fail(where, f"{ctx} must be an object")
    group = _get(t, "group", str, where, ctx)
    kind = _get(t, "kind", str, where, ctx)
    layout = _get(t, "layout", str, where, ctx)
    dtype = _get(t, "dtype", str, where, ctx)
    shape = _get(t, "shape", list, where, ctx)
    param = t.get("param")
    if group not in GROUPS or kind not in KINDS or layout not in LAYOUTS:
        raise _fail(where, f"{ctx}: group/kind/layout {group!r}/{kind!r}/{layout!r} not known")
    if dtype not in DTYPE_NAMES:
        raise _fail(where, f"{ctx}.dtype={dtype!r} is not one of {sorted(DTYPE_NAMES)}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail(where, f"{ctx}.shape={shape!r} is not a list of sizes")
    if param is not None and not isinstance(param, str):
        raise _fail(where, f"{ctx}.param must be a string or null")
    numel = math.prod(shape)
    if "alias_of" in t:
        alias = t["alias_of"]
        if not isinstance(alias, str):
            raise _fail(where, f"{ctx}.alias_of must be a tensor path")
        return TensorEntry(path, group, kind, layout, param, tuple(shape), dtype, (), alias)
    chunks = []
    for i, c in enumerate(_get(t, "chunks", list, where, ctx)):
        cctx = f"{ctx}.chunks[{i}]"
        if not isinstance(c, dict):
            raise _fail(where, f"{cctx} must be an object")
        file = _get(c, "file", str, where, cctx)
        if file not in files:
            raise _fail(where, f"{cctx}.file={file!r} is not listed in files")
        if files[file].group != group:
            raise _fail(where, f"{cctx}.file={file!r} is not a {group!r} file")
        sha = _get(c, "sha256", str, where, cctx)
        if not _SHA_RE.fullmatch(sha):
            raise _fail(where, f"{cctx}.sha256 is not a sha256 hex digest")
        rank = c.get("rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
            raise _fail(where, f"{cctx}.rank must be an integer")
        chunks.append(
            Chunk(
                file=file,
                key=_get(c, "key", str, where, cctx),
                start=_int(c, "start", where, cctx),
                stop=_int(c, "stop", where, cctx),
                sha256=sha,
                rank=rank,
            )
        )
    if layout == "per_rank":
        ranks = [c.rank for c in chunks]
        if ranks != list(range(world)) or any(c.start != 0 or c.stop != numel for c in chunks):
            raise _fail(where, f"{ctx}: a per_rank tensor needs one full chunk per rank in order")
    else:
        pos = 0
        for c in chunks:
            if c.start != pos or c.stop <= c.start:
                raise _fail(
                    where,
                    f"{ctx}: chunks must tile [0, {numel}) in order; chunk "
                    f"[{c.start}, {c.stop}) does not start at {pos}",
                )
            pos = c.stop
        if pos != numel:
            raise _fail(
                where, f"{ctx}: chunks cover [0, {pos}) but the tensor has {numel} elements"
            )
    return TensorEntry(path, group, kind, layout, param, tuple(shape), dtype, tuple(chunks))


def read_index(tag_dir: Path) -> Index:
    """Read and validate ``<tag_dir>/index.json``."""
    path = tag_dir / INDEX_NAME
    if not tag_dir.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {tag_dir} does not exist")
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{path} does not exist: {tag_dir} is not a committed checkpoint (an interrupted "
            "save leaves no index); pick another tag with list_tags()"
        )
    try:
        raw = loads_json(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(
            f"{INDEX_NAME} is not valid JSON: {e}", where=str(tag_dir)
        ) from e
    return parse_index(raw, tag_dir)
