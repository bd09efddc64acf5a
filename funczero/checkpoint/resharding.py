"""``reshard``: rewrite a checkpoint for another world size (and ZeRO stage), offline.

Every tensor is stored as flat chunks split by ``ShardSpec.bounds`` (see
:mod:`funczero.checkpoint.chunks`), whatever the stage, so resharding is re-cutting each tensor's element range into ``N`` chunks.
Each tensor streams once, in order, from the source chunks to the ``N`` output files of its
group (all open at once), in blocks of :data:`BLOCK_ELEMS`: memory stays near one block,
whatever the model or tensor size.

The stage only changes labels in ``index.json`` (which leaves a state of that stage holds as
shards, read from the stage's policy row, :data:`funczero.parallel.stages.STAGES`): parameter
dtypes and aliases are kept, and :func:`~funczero.checkpoint.load` casts
where a stage keeps parameters in another dtype (stage 3 shards are fp32). Offline, the stage-3
persistence threshold is unknown, so a stage-3 target lists every parameter as sharded; a
state that keeps some full loads it all the same. RNG states are re-derived per new rank when
the world size changes (as :func:`~funczero.checkpoint.load` does).

Online loading reshards too; this is for moving checkpoints between clusters, or to check a
conversion with ``funczero ckpt verify``/``diff``.

Example:
    >>> import tempfile
    >>> from funczero.checkpoint import save, inspect
    >>> from funczero.testing.states import toy_state
    >>> src = save(tempfile.mkdtemp(), toy_state())
    >>> out = reshard(src, tempfile.mkdtemp(), world_size=4, stage=3)
    >>> inspect(out).world_size, inspect(out).stage
    (4, 3)
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from funczero.checkpoint.atomic import TMP_PREFIX, atomic_write_text, fsync_dir, replace_dir
from funczero.checkpoint.chunks import RECORDS_KEY, records_json
from funczero.checkpoint.entry import Chunk, TensorEntry
from funczero.checkpoint.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    StateMismatchError,
)
from funczero.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUPS,
    INDEX_NAME,
    MAX_WORLD_SIZE,
    shard_file_name,
    validate_tag,
)
from funczero.checkpoint.index import Index, read_index
from funczero.checkpoint.reader import BLOCK_ELEMS, ShardReader, derive_rng
from funczero.checkpoint.tags import check_latest_replaceable, latest_tag, resolve, write_latest
from funczero.checkpoint.tensorfile import TensorFileWriter
from funczero.parallel.stages import STAGES
from funczero.train.state import LeafLayout

__all__ = ["reshard"]


def _param_of(e: TensorEntry, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The parameter a per-parameter leaf belongs to, or None.

    Shards record it (``param``). A replicated leaf does not, so its documented path names it
    (``params/<fqn>``, ``master/<fqn>``, ``opt_state/.../<fqn>``; docs/checkpoint-format.md),
    when its shape is that parameter's.
    """
    if e.param is not None:
        return e.param
    name = e.path.split("/", 1)[1] if e.kind in ("param", "master") else e.path.rsplit("/", 1)[1]
    return name if shapes.get(name) == e.shape else None


def _relabel(
    e: TensorEntry, stage: int, sharded: set[str], shapes: Mapping[str, tuple[int, ...]]
) -> TensorEntry:
    """``e`` laid out as a state of ``stage`` holds it (the values do not change)."""
    if e.placement == "per_rank" or e.kind not in ("param", "master", "moment"):
        return e
    name = _param_of(e, shapes)
    if name is None:
        return e
    shard = name in sharded if e.kind == "param" else STAGES[stage].master_sharded
    placement = "shard" if shard else "replicated"
    layout = LeafLayout(e.kind, placement, name if shard else None, e.shape)  # type: ignore[arg-type]
    return dataclasses.replace(e, layout=layout)


def reshard(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    world_size: int,
    stage: int | None = None,
    tag: str | None = None,
    out_tag: str | None = None,
) -> Path:
    """Write checkpoint ``directory`` (root or tag dir) as ``<out>/<out_tag>`` for ``world_size``.

    Args:
        world_size: the new number of ranks.
        stage: the new ZeRO stage (default: unchanged).
        tag: source tag (default ``latest``).
        out_tag: output tag (default: the source tag). ``<out>/latest`` is pointed at it.

    Returns:
        The new tag directory (committed atomically, like :func:`~funczero.checkpoint.save`).
    """
    if not isinstance(world_size, int) or not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ValueError(f"world_size={world_size!r} must be an int from 1 to {MAX_WORLD_SIZE}")
    if stage is not None and stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage!r} must be 0, 1, 2 or 3")
    src = resolve(directory, tag)
    index = read_index(src)
    new_tag = validate_tag(out_tag or index.tag)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    check_latest_replaceable(root)
    if (root / new_tag).exists():
        raise CheckpointExistsError(
            f"{root / new_tag} already exists; choose another OUT or --out-tag"
        )
    new_stage = index.stage if stage is None else stage
    if new_stage == index.stage:
        sharded = set(index.sharded)
    else:  # the persistence threshold is unknown offline: every parameter, or none
        sharded = set(index.param_shapes) if STAGES[new_stage].params_at_rest == "shard" else set()
    _check_reshardable(index, world_size, str(src))

    ckpt_id = uuid.uuid4().hex
    tmp = root / f"{TMP_PREFIX}{new_tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files, tensors = _write(src, index, tmp, world_size, ckpt_id, new_tag, new_stage, sharded)
        raw = copy.deepcopy(dict(index.raw))
        now = time.time_ns()
        raw.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            checkpoint_id=ckpt_id,
            tag=new_tag,
            world_size=world_size,
            stage=new_stage,
            created=datetime.datetime.fromtimestamp(now / 1e9, datetime.timezone.utc).isoformat(),
            created_ns=now,
            files=files,
            tensors=tensors,
            resharded_from={
                "tag": index.tag,
                "checkpoint_id": index.checkpoint_id,
                "world_size": index.world_size,
                "stage": index.stage,
            },
        )
        raw["params"]["sharded"] = sorted(sharded)
        if world_size != index.world_size:
            raw.pop("client_state_per_rank", None)
        atomic_write_text(tmp / INDEX_NAME, json.dumps(raw, indent=1) + "\n")
        fsync_dir(tmp)
        replace_dir(tmp, root / new_tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(root, new_tag)
    return root / new_tag


def _check_reshardable(index: Index, world_size: int, where: str) -> None:
    """Refuse per-rank tensors other than the RNG at a new world size (no rank owns them)."""
    if world_size == index.world_size:
        return
    bad = [e.path for e in index.tensors.values() if e.placement == "per_rank" and e.kind != "rng"]
    if bad:
        raise StateMismatchError(
            mismatched=[
                f"{p}: saved per rank; it cannot be resharded to {world_size} ranks" for p in bad
            ],
            where=where,
        )


def _point_latest(root: Path, tag: str) -> None:
    try:
        current = latest_tag(root)
    except CorruptCheckpointError:  # garbage in OUT/latest: replaced by the new tag
        current = None
    if current != tag:
        write_latest(root, tag)


def _write(
    src: Path,
    index: Index,
    tmp: Path,
    world: int,
    ckpt_id: str,
    tag: str,
    stage: int,
    sharded: set[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "checkpoint_id": ckpt_id,
        "tag": tag,
        "world_size": str(world),
    }
    with ShardReader(src, index) as reader:
        for group in GROUPS:
            stored = [e for e in index.tensors.values() if e.group == group and e.alias_of is None]
            pieces: list[list[tuple[TensorEntry, int, int]]] = [[] for _ in range(world)]
            for e in stored:
                for r, start, stop in e.stored_ranges(world):
                    pieces[r].append((e, start, stop))
            writers = [_writer(tmp, group, r, world, pieces[r], meta) for r in range(world)]
            try:
                for e in stored:
                    _stream_tensor(reader, index, e, world, writers)
                records = [w.finish() for w in writers]
            except BaseException:
                for w in writers:
                    w.abort()
                raise
            for r, rec in enumerate(records):
                files[rec.path.name] = {
                    "group": group,
                    "rank": r,
                    "bytes": rec.bytes,
                    "sha256": rec.sha256,
                }
            for e in stored:
                per_rank = e.placement == "per_rank"
                chunks = tuple(
                    Chunk(
                        shard_file_name(group, r, world),
                        e.path,
                        start,
                        stop,
                        records[r].digests[e.path],
                        r if per_rank else None,
                    )
                    for r, start, stop in e.stored_ranges(world)
                )
                relabelled = _relabel(e, stage, sharded, index.param_shapes)
                tensors[e.path] = dataclasses.replace(relabelled, chunks=chunks).to_json()
    for e in index.tensors.values():
        if e.alias_of is not None:
            tensors[e.path] = _relabel(e, stage, sharded, index.param_shapes).to_json()
    tensors = {p: tensors[p] for p in index.tensors}  # keep the source order
    return dict(sorted(files.items())), tensors


def _writer(
    tmp: Path,
    group: str,
    rank: int,
    world: int,
    pieces: list[tuple[TensorEntry, int, int]],
    meta: dict[str, str],
) -> TensorFileWriter:
    """The writer of ``group``'s file of ``rank``, for its ``(entry, start, stop)`` pieces."""
    records = {e.path: (e.shape, start, stop) for e, start, stop in pieces}
    return TensorFileWriter(
        tmp / shard_file_name(group, rank, world),
        [(e.path, e.dtype, (stop - start,)) for e, start, stop in pieces],
        {**meta, "rank": str(rank), "group": group, RECORDS_KEY: records_json(records)},
    )


def _stream_tensor(
    reader: ShardReader, index: Index, e: TensorEntry, world: int, writers: list[TensorFileWriter]
) -> None:
    if e.placement == "per_rank":
        if world == index.world_size:
            for r in range(world):
                writers[r].append(reader.read_rank(e, r).reshape(-1))
        else:
            base = reader.read_rank(e, 0)
            for r in range(world):
                writers[r].append(derive_rng(base, r, base).reshape(-1))
        return
    # Stream the whole tensor once (so every source chunk is checksum-verified) and route each
    # block's elements to the output ranks whose ranges they fall in.
    pieces = e.stored_ranges(world)
    j = 0
    for pos, block in reader.iter_range(e, 0, e.numel, BLOCK_ELEMS):
        off = 0
        while off < block.numel():
            r, _, stop = pieces[j]
            if pos >= stop:
                j += 1
                continue
            take = min(stop - pos, block.numel() - off)
            writers[r].append(block[off : off + take])
            pos += take
            off += take
