"""``index.json``: its parsed form and the validation every reader goes through.

The index is plain JSON with a fixed schema (see ``docs/checkpoint-format.md``). Before any
value of it is used, :func:`parse_index` checks types and ranges, that file names are plain
names of the ``<model|optim>-shard-RRRRR-of-WWWWW.safetensors`` form for its world size, that
every tensor entry is valid (:meth:`TensorEntry.from_json
<funczero.checkpoint.entry.TensorEntry.from_json>`: its chunks cover it exactly once, its shape
is its parameter's), that aliases point at stored tensors of the same shape and dtype, and that
the tensors fit in the files said to hold them. Every check costs time proportional to the
index's own size: a number in it (``world_size``, a shape) never makes the reader loop, build
or allocate more.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from funczero.checkpoint.entry import Chunk, TensorEntry
from funczero.checkpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from funczero.checkpoint.format import (
    FILE_RE,
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUPS,
    INDEX_NAME,
    MAX_INDEX_BYTES,
    MAX_JSON_DEPTH,
    MAX_WORLD_SIZE,
    PRECISIONS,
    deeper_than,
    validate_tag,
)
from funczero.checkpoint.safe_io import loads_json, read_limited, safe_child
from funczero.checkpoint.schema import SHA256_RE, Schema, as_shape, show

__all__ = ["FileEntry", "Index", "parse_index", "read_index"]


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


def parse_index(raw: Any, tag_dir: Path) -> Index:
    """Validate the JSON object of an ``index.json`` and return it as an :class:`Index`."""
    schema = Schema(str(tag_dir))
    if not isinstance(raw, dict):
        raise schema.fail(f"top level must be an object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT_NAME:
        raise schema.fail(f"format is {show(raw.get('format'))}, expected {FORMAT_NAME!r}")
    version = schema.get_int(raw, "format_version", "index", lo=1)
    if version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"format_version {version} is newer than this funczero understands "
            f"({FORMAT_VERSION}); upgrade funczero to read it",
            where=schema.where,
        )
    world = schema.get_int(raw, "world_size", "index", lo=1)
    if world > MAX_WORLD_SIZE:
        raise schema.fail(f"world_size={world} is more than the {MAX_WORLD_SIZE} ranks possible")
    stage = schema.get_int(raw, "stage", "index")
    if stage > 3:
        raise schema.fail(f"stage={stage} must be 0-3")
    precision = schema.get(raw, "precision", str, "index")
    if precision not in PRECISIONS:
        raise schema.fail(f"precision={show(precision)} must be one of {PRECISIONS}")
    free_form = {k: v for k, v in raw.items() if k not in ("tensors", "files")}
    if deeper_than(free_form, MAX_JSON_DEPTH):  # reshard copies and re-serialises them
        raise schema.fail(f"values nested more than {MAX_JSON_DEPTH} levels deep")
    per_rank = raw.get("client_state_per_rank")
    if per_rank is not None and (not isinstance(per_rank, list) or len(per_rank) != world):
        raise schema.fail(f"client_state_per_rank must be a list of {world} client states")
    params = _parse_params(schema.get(raw, "params", dict, "index"), schema)
    files = _parse_files(schema.get(raw, "files", dict, "index"), world, tag_dir, schema)
    tensors = {
        path: TensorEntry.from_json(path, t, params["shapes"], files, world, schema)
        for path, t in schema.get(raw, "tensors", dict, "index").items()
    }
    _check_aliases(tensors, schema)
    _check_file_sizes(tensors, files, schema)
    return Index(
        raw=raw,
        format_version=version,
        tag=validate_tag(schema.get(raw, "tag", str, "index")),
        checkpoint_id=schema.get(raw, "checkpoint_id", str, "index"),
        step=schema.get_int(raw, "step", "index"),
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


def _parse_params(params: Mapping[str, Any], schema: Schema) -> dict[str, Any]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, value in schema.get(params, "shapes", dict, "index.params").items():
        shape = as_shape(value)
        if shape is None:
            raise schema.fail(f"params.shapes[{show(name)}]={show(value)} is not a shape")
        shapes[name] = shape

    def names(key: str, known: Mapping[str, Any] | None) -> tuple[str, ...]:
        value = params.get(key) or []
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise schema.fail(f"params.{key} must be a list of names, got {show(value)}")
        unknown = [n for n in value if known is not None and n not in known]
        if unknown:
            raise schema.fail(f"params.{key} names {show(unknown[0])}, not in params.shapes")
        return tuple(value)

    aliases = params.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(v, str) and v in shapes for v in aliases.values()
    ):
        raise schema.fail("params.aliases must map alias names to names in params.shapes")
    clash = next((a for a in aliases if a in shapes), None)
    if clash is not None:
        raise schema.fail(f"params.aliases: {show(clash)} is a parameter, not an alias of one")
    return {
        "shapes": shapes,
        "trainable": names("trainable", shapes),
        "sharded": names("sharded", shapes),
        "aliases": dict(aliases),
        "non_persistent_buffers": names("non_persistent_buffers", None),
    }


def _parse_files(
    raw: Mapping[str, Any], world: int, tag_dir: Path, schema: Schema
) -> dict[str, FileEntry]:
    if len(raw) != len(GROUPS) * world:
        # Checked first: the count bounds everything that depends on the world size.
        raise schema.fail(
            f"files lists {len(raw)} shard files; world_size={world} needs "
            f"{len(GROUPS) * world} (a model and an optim file per rank)"
        )
    files: dict[str, FileEntry] = {}
    for name, f in raw.items():
        safe_child(tag_dir, name)
        m = FILE_RE.fullmatch(name)
        if not m or int(m.group(3)) != world or int(m.group(2)) >= world:
            raise schema.fail(
                f"file name {show(name)} is not "
                f"'<model|optim>-shard-RRRRR-of-{world:05d}.safetensors'"
            )
        ctx = f"files[{name!r}]"
        if not isinstance(f, dict):
            raise schema.fail(f"{ctx} must be an object")
        group, rank = m.group(1), int(m.group(2))
        if f.get("group", group) != group or f.get("rank", rank) != rank:
            raise schema.fail(f"{ctx}: group/rank disagree with the file name")
        sha = schema.get(f, "sha256", str, ctx)
        if not SHA256_RE.fullmatch(sha):
            raise schema.fail(f"{ctx}.sha256 is not a sha256 hex digest")
        files[name] = FileEntry(name, group, rank, schema.get_int(f, "bytes", ctx), sha)
    # 2 * world distinct valid names of this world size: every rank's two files are present.
    return files


def _check_aliases(tensors: Mapping[str, TensorEntry], schema: Schema) -> None:
    for entry in tensors.values():
        if entry.alias_of is None:
            continue
        target = tensors.get(entry.alias_of)
        if (
            target is None
            or target.alias_of is not None
            or (target.shape, target.dtype) != (entry.shape, entry.dtype)
        ):
            raise schema.fail(
                f"tensor {show(entry.path)} is an alias of {show(entry.alias_of)}, which is "
                "not a stored tensor of the same shape and dtype"
            )


def _check_file_sizes(
    tensors: Mapping[str, TensorEntry], files: Mapping[str, FileEntry], schema: Schema
) -> None:
    """Refuse tensors larger than the files said to hold them (bounds every later read)."""
    held = dict.fromkeys(files, 0)
    for entry in tensors.values():
        for c in entry.chunks:
            held[c.file] += c.numel * entry.dtype.itemsize
    for name, n in held.items():
        if n > files[name].bytes:
            raise schema.fail(
                f"its tensors put {n:,} bytes in {name}, which files says has "
                f"{files[name].bytes:,} bytes"
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
