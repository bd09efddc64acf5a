"""``reshard``: rewrite a checkpoint for another world size (and ZeRO stage), offline.

Every tensor is stored as flat chunks split by :func:`~funczero.checkpoint.layout.chunk_bounds`,
whatever the stage, so resharding is re-cutting each tensor's element range into ``N`` chunks.
Each tensor streams once, in order, from the source chunks to the ``N`` output files of its
group (all open at once), in blocks of :data:`BLOCK_ELEMS`: memory stays near one block,
whatever the model or tensor size.

The stage only changes labels in ``index.json`` (which leaves a state of that stage holds as
shards): parameter dtypes and aliases are kept, and :func:`~funczero.checkpoint.load` casts
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
import datetime
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from funczero.checkpoint.atomic import TMP_PREFIX, atomic_write_text, fsync_dir, replace_dir
from funczero.checkpoint.errors import CheckpointExistsError, StateMismatchError
from funczero.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUPS,
    INDEX_NAME,
    shard_file_name,
    validate_tag,
)
from funczero.checkpoint.index import Chunk, Index, TensorEntry, read_index
from funczero.checkpoint.layout import chunk_bounds
from funczero.checkpoint.reader import BLOCK_ELEMS, ShardReader, derive_rng
from funczero.checkpoint.tags import latest_tag, resolve, write_latest
from funczero.checkpoint.tensorfile import TensorFileWriter

__all__ = ["reshard"]


def _relabel(e: TensorEntry, stage: int, sharded: set[str]) -> tuple[str, str | None]:
    """``(layout, param)`` of ``e`` in a state of ``stage``."""
    if e.layout == "per_rank" or e.kind not in ("param", "master", "moment"):
        return e.layout, e.param
    name = e.path.split("/", 1)[1] if e.kind in ("param", "master") else e.path.rsplit("/", 1)[1]
    shard = name in sharded if e.kind == "param" else stage >= 1
    return ("shard", name) if shard else ("replicated", None)


def _pieces(e: TensorEntry, world: int) -> list[tuple[int, int, int]]:
    """``(rank, start, stop)`` of each output chunk of ``e`` (per_rank: one whole per rank)."""
    if e.layout == "per_rank":
        return [(r, 0, e.numel) for r in range(world)]
    bounds = [(r, *chunk_bounds(e.numel, world, r)) for r in range(world)]
    return [(r, a, b) for r, a, b in bounds if a < b]


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
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive int")
    if stage is not None and stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage!r} must be 0, 1, 2 or 3")
    src = resolve(directory, tag)
    reader_index = read_index(src)
    new_tag = validate_tag(out_tag or reader_index.tag)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if (root / new_tag).exists():
        raise CheckpointExistsError(
            f"{root / new_tag} already exists; choose another OUT or --out-tag"
        )
    new_stage = reader_index.stage if stage is None else stage
    names = list(reader_index.param_shapes)
    if stage is None or stage == reader_index.stage:
        sharded = set(reader_index.raw["params"].get("sharded") or [])
    else:
        sharded = set(names) if new_stage == 3 else set()
    per_rank_bad = [
        e.path
        for e in reader_index.tensors.values()
        if e.layout == "per_rank" and e.kind != "rng" and world_size != reader_index.world_size
    ]
    if per_rank_bad:
        raise StateMismatchError(
            mismatched=[
                f"{p}: saved per rank; it cannot be resharded to {world_size} ranks"
                for p in per_rank_bad
            ],
            where=str(src),
        )

    ckpt_id = uuid.uuid4().hex
    tmp = root / f"{TMP_PREFIX}{new_tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files, tensors = _write(
            src, reader_index, tmp, world_size, ckpt_id, new_tag, new_stage, sharded
        )
        raw = copy.deepcopy(dict(reader_index.raw))
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
                "tag": reader_index.tag,
                "checkpoint_id": reader_index.checkpoint_id,
                "world_size": reader_index.world_size,
                "stage": reader_index.stage,
            },
        )
        raw["params"]["sharded"] = sorted(sharded)
        if world_size != reader_index.world_size:
            raw.pop("client_state_per_rank", None)
        atomic_write_text(tmp / INDEX_NAME, json.dumps(raw, indent=1) + "\n")
        fsync_dir(tmp)
        replace_dir(tmp, root / new_tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if latest_tag(root) != new_tag:
        write_latest(root, new_tag)
    return root / new_tag


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
    with ShardReader(src, index) as reader:
        for group in GROUPS:
            stored = [e for e in index.tensors.values() if e.group == group and e.alias_of is None]
            writers = []
            for r in range(world):
                entries = [
                    (e.path, e.torch_dtype, (stop - start,))
                    for e in stored
                    for rank, start, stop in _pieces(e, world)
                    if rank == r
                ]
                meta = {
                    "format": FORMAT_NAME,
                    "format_version": str(FORMAT_VERSION),
                    "checkpoint_id": ckpt_id,
                    "tag": tag,
                    "rank": str(r),
                    "world_size": str(world),
                    "group": group,
                }
                writers.append(
                    TensorFileWriter(tmp / shard_file_name(group, r, world), entries, meta)
                )
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
                chunks = [
                    Chunk(
                        shard_file_name(group, r, world),
                        e.path,
                        start,
                        stop,
                        records[r].digests[e.path],
                        r if e.layout == "per_rank" else None,
                    )
                    for r, start, stop in _pieces(e, world)
                ]
                layout, param = _relabel(e, stage, sharded)
                tensors[e.path] = TensorEntry(
                    e.path, e.group, e.kind, layout, param, e.shape, e.dtype, tuple(chunks)
                ).to_json()
    for e in index.tensors.values():
        if e.alias_of is not None:
            layout, param = _relabel(e, stage, sharded)
            tensors[e.path] = TensorEntry(
                e.path, e.group, e.kind, layout, param, e.shape, e.dtype, alias_of=e.alias_of
            ).to_json()
    tensors = {p: tensors[p] for p in index.tensors}  # keep the source order
    return dict(sorted(files.items())), tensors


def _stream_tensor(
    reader: ShardReader, index: Index, e: TensorEntry, world: int, writers: list[TensorFileWriter]
) -> None:
    if e.layout == "per_rank":
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
    pieces = _pieces(e, world)
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
