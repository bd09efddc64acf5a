"""``index.json``: its parsed form and the validation every reader goes through.

The index is plain JSON with a fixed schema (see ``docs/checkpoint-format.md``). Before any
value of it is used, :func:`parse_index` checks types and ranges, that file names are plain
names of the ``<model|optim>-shard-RRRRR-of-WWWWW.safetensors`` form for its world size, that
the chunks cover each tensor exactly once (rank ``r``'s part, under the tensor's path, in rank
``r``'s file), that shapes agree with the parameters', and that aliases point at stored tensors
of the same shape and dtype. Every check costs time proportional to the index's own size: a
number in it (``world_size``, a shape) never makes the reader build or allocate more.

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
import functools
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from funczero.checkpoint.entry import Chunk, TensorEntry
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
    MAX_DIM,
    MAX_INDEX_BYTES,
    MAX_JSON_DEPTH,
    MAX_NDIM,
    MAX_WORLD_SIZE,
    PRECISIONS,
    deeper_than,
    dtype_from_name,
    shard_file_name,
    validate_tag,
)
from funczero.checkpoint.safe_io import loads_json, read_limited, safe_child
from funczero.train.state import LeafLayout

__all__ = ["FileEntry", "Index", "parse_index", "read_index"]

_SHA_RE = re.compile(r"[0-9a-f]{64}")
_HEADS = {"param": "params/", "master": "master/", "buffer": "buffers/"}
"""Kinds whose path is ``<head><module FQN>`` (consolidate turns the FQN into the key)."""


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
    """A parsed, validated ``index.json``; ``raw`` keeps the JSON object as read.

    Attributes:
        param_shapes: global shape of every parameter (canonical FQNs, module order).
        trainable: parameters that have master weights and optimizer state.
        sharded: parameters whose ``params/`` tensor was a shard in the saved state.
        aliases: tied parameters, alias FQN -> canonical FQN (module-level ties).
        non_persistent_buffers: buffers left out of ``state_dict()`` (and of consolidate).
        tensors: every leaf by path.
        files: every shard file by name.
    """

    raw: Mapping[str, Any]
    format_version: int
    tag: str
    checkpoint_id: str
    step: int
    world_size: int
    stage: int
    precision: str
    param_shapes: Mapping[str, tuple[int, ...]]
    trainable: tuple[str, ...]
    sharded: tuple[str, ...]
    aliases: Mapping[str, str]
    non_persistent_buffers: tuple[str, ...]
    tensors: Mapping[str, TensorEntry]
    files: Mapping[str, FileEntry]

    @property
    def client_state(self) -> Any:
        return self.raw.get("client_state")

    @property
    def client_state_per_rank(self) -> list[Any] | None:
        """Each rank's client state (only when ranks saved different ones)."""
        return self.raw.get("client_state_per_rank")

    @property
    def has_file_records(self) -> bool:
        """Whether shard files record their chunks (format version 2 and later)."""
        return self.format_version >= 2

    def resolve(self, entry: TensorEntry) -> TensorEntry:
        """The entry holding ``entry``'s values (itself unless it is an alias)."""
        return self.tensors[entry.alias_of] if entry.alias_of else entry

    @functools.cached_property
    def _by_file(self) -> dict[str, list[tuple[TensorEntry, Chunk]]]:
        out: dict[str, list[tuple[TensorEntry, Chunk]]] = {name: [] for name in self.files}
        for entry in self.tensors.values():
            for c in entry.chunks:
                out[c.file].append((entry, c))
        return out

    def chunks_in(self, file: str) -> list[tuple[TensorEntry, Chunk]]:
        """``(entry, chunk)`` of every chunk the index places in shard file ``file``."""
        return self._by_file.get(file, [])


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short: hostile values must not flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _fail(where: str, msg: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"malformed {INDEX_NAME}: {msg}", where=where)


def _get(
    obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str, ctx: str
) -> Any:
    if key not in obj:
        raise _fail(where, f"{ctx}: required key {key!r} is missing")
    value = obj[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        name = getattr(types, "__name__", types)
        raise _fail(where, f"{ctx}.{key} must be {name}, got {_show(value)}")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str, ctx: str, lo: int = 0) -> int:
    value = _get(obj, key, int, where, ctx)
    if not lo <= value <= MAX_DIM:
        raise _fail(where, f"{ctx}.{key}={_show(value)} must be between {lo} and {MAX_DIM}")
    return value


def _shape(value: Any) -> tuple[int, ...] | None:
    """``value`` as a shape, or None if it is not a list of at most MAX_NDIM valid sizes."""
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        return None
    if not all(type(d) is int and 0 <= d <= MAX_DIM for d in value):
        return None
    return tuple(value) if math.prod(value) <= MAX_DIM else None


def parse_index(raw: Any, tag_dir: Path) -> Index:
    """Validate the JSON object of an ``index.json`` and return it as an :class:`Index`."""
    where = str(tag_dir)
    if not isinstance(raw, dict):
        raise _fail(where, f"top level must be an object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT_NAME:
        raise _fail(where, f"format is {_show(raw.get('format'))}, expected {FORMAT_NAME!r}")
    version = _int(raw, "format_version", where, "index", lo=1)
    if version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"format_version {version} is newer than this funczero understands "
            f"({FORMAT_VERSION}); upgrade funczero to read it",
            where=where,
        )
    world = _int(raw, "world_size", where, "index", lo=1)
    if world > MAX_WORLD_SIZE:
        raise _fail(where, f"world_size={world} is more than the {MAX_WORLD_SIZE} ranks possible")
    stage = _int(raw, "stage", where, "index")
    if stage > 3:
        raise _fail(where, f"stage={stage} must be 0-3")
    precision = _get(raw, "precision", str, where, "index")
    if precision not in PRECISIONS:
        raise _fail(where, f"precision={_show(precision)} must be one of {PRECISIONS}")
    params = _parse_params(_get(raw, "params", dict, where, "index"), where)
    files = _parse_files(_get(raw, "files", dict, where, "index"), world, tag_dir)
    tensors = {
        path: _parse_tensor(path, t, params["shapes"], files, world, where)
        for path, t in _get(raw, "tensors", dict, where, "index").items()
    }
    _check_aliases(tensors, where)
    _check_file_sizes(tensors, files, where)
    free_form = {k: v for k, v in raw.items() if k not in ("tensors", "files")}
    if deeper_than(free_form, MAX_JSON_DEPTH):  # reshard copies and re-serialises them
        raise _fail(where, f"values nested more than {MAX_JSON_DEPTH} levels deep")
    per_rank = raw.get("client_state_per_rank")
    if per_rank is not None and (not isinstance(per_rank, list) or len(per_rank) != world):
        raise _fail(where, f"client_state_per_rank must be a list of {world} client states")
    return Index(
        raw=raw,
        format_version=version,
        tag=validate_tag(_get(raw, "tag", str, where, "index")),
        checkpoint_id=_get(raw, "checkpoint_id", str, where, "index"),
        step=_int(raw, "step", where, "index"),
        world_size=world,
        stage=stage,
        precision=precision,
        param_shapes=params["shapes"],
        trainable=params["trainable"],
        sharded=params["sharded"],
        aliases=params["aliases"],
        non_persistent_buffers=params["non_persistent_buffers"],
        tensors=tensors,
        files=files,
    )


def _parse_params(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, value in _get(params, "shapes", dict, where, "index.params").items():
        shape = _shape(value)
        if shape is None:
            raise _fail(where, f"params.shapes[{_show(name)}]={_show(value)} is not a shape")
        shapes[name] = shape

    def names(key: str, known: Mapping[str, Any] | None) -> tuple[str, ...]:
        value = params.get(key) or []
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise _fail(where, f"params.{key} must be a list of names, got {_show(value)}")
        unknown = [n for n in value if known is not None and n not in known]
        if unknown:
            raise _fail(where, f"params.{key} names {_show(unknown[0])}, not in params.shapes")
        return tuple(value)

    aliases = params.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(v, str) and v in shapes for v in aliases.values()
    ):
        raise _fail(where, "params.aliases must map alias names to names in params.shapes")
    return {
        "shapes": shapes,
        "trainable": names("trainable", shapes),
        "sharded": names("sharded", shapes),
        "aliases": dict(aliases),
        "non_persistent_buffers": names("non_persistent_buffers", None),
    }


def _parse_files(raw: Mapping[str, Any], world: int, tag_dir: Path) -> dict[str, FileEntry]:
    where = str(tag_dir)
    if len(raw) != len(GROUPS) * world:
        # Checked first: the count bounds everything that depends on the world size.
        raise _fail(
            where,
            f"files lists {len(raw)} shard files; world_size={world} needs "
            f"{len(GROUPS) * world} (a model and an optim file per rank)",
        )
    files: dict[str, FileEntry] = {}
    for name, f in raw.items():
        safe_child(tag_dir, name)
        m = FILE_RE.fullmatch(name)
        if not m or int(m.group(3)) != world or int(m.group(2)) >= world:
            raise _fail(
                where,
                f"file name {_show(name)} is not "
                f"'<model|optim>-shard-RRRRR-of-{world:05d}.safetensors'",
            )
        ctx = f"files[{name!r}]"
        if not isinstance(f, dict):
            raise _fail(where, f"{ctx} must be an object")
        group, rank = m.group(1), int(m.group(2))
        if f.get("group", group) != group or f.get("rank", rank) != rank:
            raise _fail(where, f"{ctx}: group/rank disagree with the file name")
        sha = _get(f, "sha256", str, where, ctx)
        if not _SHA_RE.fullmatch(sha):
            raise _fail(where, f"{ctx}.sha256 is not a sha256 hex digest")
        files[name] = FileEntry(name, group, rank, _int(f, "bytes", where, ctx), sha)
    # 2 * world distinct valid names of this world size: every rank's two files are present.
    return files


def _parse_tensor(
    path: str,
    t: Any,
    shapes: Mapping[str, tuple[int, ...]],
    files: Mapping[str, FileEntry],
    world: int,
    where: str,
) -> TensorEntry:
    ctx = f"tensors[{_show(path)}]"
    if not isinstance(t, dict):
        raise _fail(where, f"{ctx} must be an object")
    group = _get(t, "group", str, where, ctx)
    kind = _get(t, "kind", str, where, ctx)
    placement = _get(t, "layout", str, where, ctx)
    dtype = _get(t, "dtype", str, where, ctx)
    param = t.get("param")
    if kind not in KINDS or placement not in LAYOUTS:
        raise _fail(where, f"{ctx}: kind/layout {_show(kind)}/{_show(placement)} not known")
    if dtype not in DTYPE_NAMES:
        raise _fail(where, f"{ctx}.dtype={dtype!r} is not one of {sorted(DTYPE_NAMES)}")
    shape = _shape(t.get("shape"))
    if shape is None:
        raise _fail(where, f"{ctx}.shape={_show(t.get('shape'))} is not a list of sizes")
    if param is not None and (not isinstance(param, str) or param not in shapes):
        raise _fail(where, f"{ctx}.param={_show(param)} is not a parameter in params.shapes")
    layout = LeafLayout(kind, placement, param, shape)  # type: ignore[arg-type]
    if group != layout.group:
        raise _fail(where, f"{ctx}: group {_show(group)} does not hold {kind} tensors")
    head = _HEADS.get(kind)
    if head is not None and (not path.startswith(head) or len(path) == len(head)):
        raise _fail(where, f"{ctx}: a {kind} tensor's path must be '{head}<name>'")
    # The parameter a leaf belongs to fixes its global shape (per_rank leaves have their own).
    owner = param or (path[len(head) :] if head and kind != "buffer" else None)
    if placement == "shard" and param is None:
        raise _fail(where, f"{ctx}: a shard tensor needs the parameter it follows (param)")
    if placement != "per_rank" and owner is not None and shapes.get(owner) != shape:
        raise _fail(
            where,
            f"{ctx}.shape={list(shape)}, but parameter {_show(owner)} has shape "
            f"{_show(shapes.get(owner) and list(shapes[owner]))} in params.shapes",
        )
    entry = TensorEntry(path, layout, dtype_from_name(dtype))
    if "alias_of" in t:
        alias = t["alias_of"]
        if not isinstance(alias, str) or "chunks" in t:
            raise _fail(where, f"{ctx}.alias_of must be a tensor path, with no chunks")
        return dataclasses.replace(entry, alias_of=alias)
    chunks = _parse_chunks(entry, _get(t, "chunks", list, where, ctx), files, world, where)
    return dataclasses.replace(entry, chunks=chunks)


def _parse_chunks(
    entry: TensorEntry, raw: list[Any], files: Mapping[str, FileEntry], world: int, where: str
) -> tuple[Chunk, ...]:
    ctx = f"tensors[{_show(entry.path)}]"
    chunks = []
    for i, c in enumerate(raw[: world + 1]):  # more than any valid tensor has: refused below
        cctx = f"{ctx}.chunks[{i}]"
        if not isinstance(c, dict):
            raise _fail(where, f"{cctx} must be an object")
        file = _get(c, "file", str, where, cctx)
        if file not in files:
            raise _fail(where, f"{cctx}.file={_show(file)} is not listed in files")
        sha = _get(c, "sha256", str, where, cctx)
        if not _SHA_RE.fullmatch(sha):
            raise _fail(where, f"{cctx}.sha256 is not a sha256 hex digest")
        rank = c.get("rank")
        if rank is not None and (type(rank) is not int or not 0 <= rank < world):
            raise _fail(where, f"{cctx}.rank must be a rank of the world size {world}")
        start, stop = _int(c, "start", where, cctx), _int(c, "stop", where, cctx)
        key = _get(c, "key", str, where, cctx)
        chunks.append(Chunk(file, key, start, stop, sha, rank))
    if entry.placement != "per_rank":
        pos = 0
        for c in chunks:
            if c.start != pos or c.stop <= c.start:
                raise _fail(
                    where,
                    f"{ctx}: chunks must tile [0, {entry.numel}) in order; chunk "
                    f"[{c.start}, {c.stop}) does not start at {pos}",
                )
            pos = c.stop
        if pos != entry.numel:
            raise _fail(
                where, f"{ctx}: chunks cover [0, {pos}) but the tensor has {entry.numel} elements"
            )
    want = entry.stored_ranges(world)
    if len(raw) != len(want):
        raise _fail(
            where,
            f"{ctx}: {len(raw)} chunks; a {entry.placement} tensor of {entry.numel} elements at "
            f"world size {world} is stored in {len(want)}",
        )
    per_rank = entry.placement == "per_rank"
    for c, (r, start, stop) in zip(chunks, want):
        expected = Chunk(
            shard_file_name(entry.group, r, world),
            entry.path,
            start,
            stop,
            c.sha256,
            r if per_rank else None,
        )
        if c != expected:
            raise _fail(
                where,
                f"{ctx}: chunk {c.file}[{_show(c.key)}] [{c.start}, {c.stop}) should be "
                f"{expected.file}[{entry.path!r}] [{start}, {stop})"
                + (f" of rank {r}" if per_rank else "")
                + ": each rank stores its own part of the tensor, under its path, exactly once",
            )
    return tuple(chunks)


def _check_aliases(tensors: Mapping[str, TensorEntry], where: str) -> None:
    for entry in tensors.values():
        if entry.alias_of is None:
            continue
        target = tensors.get(entry.alias_of)
        if (
            target is None
            or target.alias_of is not None
            or (target.shape, target.dtype) != (entry.shape, entry.dtype)
        ):
            raise _fail(
                where,
                f"tensor {_show(entry.path)} is an alias of {_show(entry.alias_of)}, which is "
                "not a stored tensor of the same shape and dtype",
            )


def _check_file_sizes(
    tensors: Mapping[str, TensorEntry], files: Mapping[str, FileEntry], where: str
) -> None:
    """Refuse tensors larger than the files said to hold them (bounds every later read)."""
    held = dict.fromkeys(files, 0)
    for entry in tensors.values():
        for c in entry.chunks:
            held[c.file] += c.numel * entry.dtype.itemsize
    for name, n in held.items():
        if n > files[name].bytes:
            raise _fail(
                where,
                f"its tensors put {n:,} bytes in {name}, which files says has "
                f"{files[name].bytes:,} bytes",
            )


def read_index(tag_dir: Path) -> Index:
    """Read and validate ``<tag_dir>/index.json`` (at most :data:`MAX_INDEX_BYTES`)."""
    path = tag_dir / INDEX_NAME
    if not tag_dir.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {tag_dir} does not exist")
    try:
        data = read_limited(path, MAX_INDEX_BYTES, what=INDEX_NAME)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{path} does not exist: {tag_dir} is not a committed checkpoint (an interrupted "
            "save leaves no index); pick another tag with list_tags()"
        ) from None
    try:
        raw = loads_json(data, max_depth=None)  # parse_index checks the free-form parts
    except ValueError as e:
        raise CorruptCheckpointError(
            f"{INDEX_NAME} is not valid JSON: {e}", where=str(tag_dir)
        ) from e
    return parse_index(raw, tag_dir)
