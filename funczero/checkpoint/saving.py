"""``save``: every rank writes its own shard files, rank 0 commits the index and ``latest``.

Protocol (``W`` ranks, all calling :func:`save`):

1. Rank 0 creates ``<root>/.funczero-tmp-<tag>/`` (clearing leftovers of interrupted saves)
   and picks a checkpoint id; the ranks agree on it (one small all-gather).
2. Every rank streams its chunks into its two files there, fsyncs them, and reports their
   checksums (second all-gather). Any failure on any rank: the temp directory is removed and
   every rank raises :class:`SaveError`; nothing else on disk changed.
3. Rank 0 writes ``index.json``, fsyncs, renames the directory to ``<root>/<tag>`` (atomic),
   then replaces ``latest`` (atomic), then applies ``keep_last``. A SIGKILL at any point leaves
   ``latest`` on a complete checkpoint: before the rename there is only a hidden temp dir.

Once ``latest`` names the new checkpoint the save has succeeded: deleting old checkpoints
(``keep_last``) can only warn, never fail it.

Hybrid sharding (:mod:`funczero.parallel.hybrid`): the state's layout is its shard group's
(``W`` = the shard group size), and every replica holds the same shards, so only the first
replica's shard group (global ranks ``0..W-1``) writes files; the other replicas take part in
the agreement and write nothing. The checkpoint is that of a ``W``-rank run: it loads at any
world size, stage and mesh. The other replicas' RNG states are not saved (a resumed run's
replicas restart from the first replica's).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from funczero.checkpoint import comm
from funczero.checkpoint.atomic import (
    TMP_PREFIX,
    TRASH_PREFIX,
    atomic_write_text,
    fsync_dir,
    replace_dir,
)
from funczero.checkpoint.chunks import RECORDS_KEY, Record, find_aliases, local_chunk, records_json
from funczero.checkpoint.entry import TensorEntry, state_entries
from funczero.checkpoint.errors import (
    CheckpointError,
    CheckpointExistsError,
    SaveError,
)
from funczero.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUPS,
    INDEX_NAME,
    KINDS,
    LATEST_NAME,
    LAYOUTS,
    check_json,
    shard_file_name,
    validate_tag,
)
from funczero.checkpoint.index_writer import build_index, tied_aliases
from funczero.checkpoint.tags import (
    apply_retention,
    check_latest_replaceable,
    latest_tag,
    list_tags,
    write_latest,
)
from funczero.checkpoint.tensorfile import TensorFileWriter
from funczero.train.state import TrainState

__all__ = ["save"]


def _write_group(
    tmp: Path,
    group: str,
    items: list[tuple[TensorEntry, torch.Tensor]],
    world: int,
    rank: int,
    meta: dict[str, str],
) -> dict[str, Any]:
    pieces = []
    records: dict[str, Record] = {}
    for entry, leaf in items:
        piece = local_chunk(entry, leaf, world, rank)
        if piece.numel() or entry.placement == "per_rank":
            pieces.append((entry, piece))
            if entry.placement == "per_rank":
                records[entry.path] = (entry.shape, 0, piece.numel())
            else:
                records[entry.path] = (entry.shape, *entry.spec(world).bounds(rank))
    name = shard_file_name(group, rank, world)
    writer = TensorFileWriter(
        tmp / name,
        [(e.path, x.dtype, (x.numel(),)) for e, x in pieces],
        {**meta, "group": group, RECORDS_KEY: records_json(records)},
    )
    try:
        for _, piece in pieces:
            writer.append(piece)
        record = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {
        "name": name,
        "bytes": record.bytes,
        "sha256": record.sha256,
        "digests": dict(record.digests),
        "per_rank_shapes": {e.path: list(e.shape) for e, _ in pieces if e.placement == "per_rank"},
    }


def _prepare(root: Path, tag: str, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    check_latest_replaceable(root)
    if (root / tag).exists() and latest_tag(root) == tag:
        raise CheckpointExistsError(
            f"{root / tag} exists and {root}/latest points to it; overwriting the checkpoint "
            "'latest' names cannot be made atomic. Save under another tag, or delete it first"
        )
    if (root / tag).exists() and tag not in list_tags(root):
        raise CheckpointExistsError(
            f"{root / tag} exists and is not a funczero checkpoint; refusing to replace it. "
            "Save under another tag or into another directory"
        )
    # One writer per root: anything hidden and temporary here is a leftover of a killed save.
    for child in root.iterdir():
        if child.name.startswith((TMP_PREFIX, TRASH_PREFIX, ".latest.tmp-")):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    tmp.mkdir()
    fsync_dir(root)


_UNTOUCHED = "the previous checkpoint and 'latest' are untouched"


def _collect(
    results: list[dict[str, Any]], what: str, outcome: str = _UNTOUCHED, key: str = "error"
) -> None:
    failed = [(i, r[key]) for i, r in enumerate(results) if r.get(key)]
    if failed:
        lines = "; ".join(f"rank {i}: {msg}" for i, msg in failed)
        raise SaveError(f"{what} failed ({lines}); {outcome}")


def _check_storable(entries: list[tuple[TensorEntry, torch.Tensor]]) -> None:
    """Refuse, before anything is written, leaves the on-disk format cannot describe."""
    for entry, _ in entries:
        entry.dtype_name  # noqa: B018 - raises TypeError naming the dtype
        if entry.kind not in KINDS or entry.placement not in LAYOUTS:
            raise ValueError(
                f"state leaf {entry.path!r} has kind {entry.kind!r} and placement "
                f"{entry.placement!r}; checkpoint format {FORMAT_VERSION} stores kinds {KINDS} "
                f"and placements {LAYOUTS} (upgrade funczero.checkpoint with the state)"
            )


def save(
    directory: str | os.PathLike[str],
    state: TrainState,
    *,
    tag: str | int | None = None,
    client_state: Any = None,
    keep_last: int | None = None,
    config: Mapping[str, Any] | None = None,
    aliases: Mapping[str, str] | None = None,
    module: nn.Module | None = None,
) -> Path:
    """Write ``state`` as checkpoint ``<directory>/<tag>`` and point ``latest`` at it.

    Every rank calls it; each writes its own shard files concurrently, and rank 0 commits.

    Args:
        directory: the checkpoint root (created if missing).
        state: the training state (its ``layout`` says world size, rank and stage).
        tag: directory name; defaults to the step (``"100"``).
        client_state: JSON-serialisable user data (data-loader position...), returned by load.
            If ranks pass different values, each rank gets its own back at the same world size.
        keep_last: keep only the newest N checkpoints (never the one ``latest`` names).
        config: the resolved run config, stored as is in ``index.json``.
        aliases: tied weights, alias FQN -> canonical FQN (consolidate writes both keys).
        module: the model; its ties and non-persistent buffers are recorded for consolidate.

    Returns:
        The committed tag directory.

    Example:
        >>> import tempfile, torch
        >>> from funczero.checkpoint import save, load
        >>> from funczero.testing.states import toy_state
        >>> root = tempfile.mkdtemp()
        >>> path = save(root, toy_state(), client_state={"batch": 7})
        >>> path.name
        '3'
        >>> state, client = load(root, like=toy_state(seed=1))
        >>> client
        {'batch': 7}
    """
    root = Path(directory)
    lay = state.layout
    world, rank = lay.world_size, lay.rank
    peers, me = _participants(world, rank)
    tag = validate_tag(int(state.step) if tag is None else tag)
    client = check_json(client_state, "client_state")
    config = check_json(config, "config")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r} must be a positive int or None")
    entries = state_entries(state)
    _check_storable(entries)
    alias_of = find_aliases(entries)
    tied = tied_aliases(state, aliases, module)
    tmp = root / f"{TMP_PREFIX}{tag}"

    ckpt_id = _agree_on_id(root, tag, tmp, peers, me)
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "checkpoint_id": ckpt_id,
        "tag": tag,
        "rank": str(rank),
        "world_size": str(world),
    }
    results = _write_shards(root / tag, tmp, entries, alias_of, meta, client, peers, me, world)

    def index() -> dict[str, Any]:
        return build_index(state, entries, alias_of, tied, results, tag, ckpt_id, config, module)

    _commit(root, tag, tmp, index, peers, me)
    if me == 0 and keep_last is not None:
        _prune(root, keep_last, tag)
    return root / tag


def _participants(world: int, rank: int) -> tuple[int, int]:
    """``(ranks taking part, this one's position)``: the state's ranks, or with hybrid sharding
    every rank of the default group, whose first ``world`` ranks (the first replica) write."""
    if world > 1 and dist.is_available() and dist.is_initialized():
        peers, me = dist.get_world_size(), dist.get_rank()
        if peers != world and peers % world == 0 and me % world == rank:
            return peers, me  # replicas of shard groups of consecutive ranks
    comm.check_world(world, rank)
    return world, rank


def _agree_on_id(root: Path, tag: str, tmp: Path, world: int, rank: int) -> str:
    """Step 1: rank 0 prepares the temporary directory; every rank learns the checkpoint id."""
    status: dict[str, Any] = {}
    local: Exception | None = None
    if rank == 0:
        try:
            _prepare(root, tag, tmp)
            status["id"] = uuid.uuid4().hex
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or they hang
            status["error"] = f"{type(e).__name__}: {e}"
            local = e
    results = comm.all_gather_json(status, world)
    if local is not None:
        if isinstance(local, CheckpointError):
            raise local
        raise SaveError(f"preparing {tmp} failed: {local}") from local
    _collect(results, f"preparing checkpoint {root / tag}")
    return str(results[0]["id"])


def _write_shards(
    target: Path,
    tmp: Path,
    entries: list[tuple[TensorEntry, torch.Tensor]],
    alias_of: dict[str, str],
    meta: dict[str, str],
    client: Any,
    peers: int,
    me: int,
    world: int,
) -> list[dict[str, Any]]:
    """Step 2: the first ``world`` of the ``peers`` ranks write their two files each; a failure
    on any rank fails every rank. Returns the writers' reports."""
    report: dict[str, Any] = {"files": [], "client_state": client}
    error: BaseException | None = None
    try:
        for group in GROUPS if me < world else ():
            items = [(e, x) for e, x in entries if e.group == group and e.path not in alias_of]
            report["files"].append(_write_group(tmp, group, items, world, me, meta))
    except Exception as e:  # noqa: BLE001 - reported to every rank, which all raise SaveError
        error = e
        report = {"error": f"{type(e).__name__}: {e}"}
    results = comm.all_gather_json(report, peers)
    if any(r.get("error") for r in results):
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier(peers)
        try:
            _collect(results, f"writing checkpoint {target}")
        except SaveError as e:
            raise e from error
    return results[:world]


def _commit(
    root: Path, tag: str, tmp: Path, index: Callable[[], Any], world: int, rank: int
) -> None:
    """Step 3: rank 0 writes the index, renames the directory into place, moves ``latest``."""
    status: dict[str, Any] = {}
    error: BaseException | None = None
    if rank == 0:
        try:
            atomic_write_text(tmp / INDEX_NAME, json.dumps(index(), indent=1) + "\n")
            fsync_dir(tmp)
            replace_dir(tmp, root / tag)
        except Exception as e:  # noqa: BLE001 - reported to every rank, which all raise SaveError
            shutil.rmtree(tmp, ignore_errors=True)
            status["error"] = f"{type(e).__name__}: {e}"
            error = e
        else:
            status = _point_latest(root, tag)
    results = comm.all_gather_json(status, world)
    try:
        _collect(results, f"committing checkpoint {root / tag}")
        outcome = str(results[0].get("outcome"))
        _collect(results, f"pointing {root / LATEST_NAME} at {tag!r}", outcome, "latest_error")
    except SaveError as e:
        raise e from error


def _point_latest(root: Path, tag: str) -> dict[str, Any]:
    """Point ``latest`` at the committed ``tag``; on failure say what did change."""
    try:
        previous = latest_tag(root)
    except Exception:  # noqa: BLE001 - only for the message; every rank waits for this report
        previous = None
    try:
        write_latest(root, tag)
    except Exception as e:  # noqa: BLE001 - reported to every rank, which all raise SaveError
        return {
            "latest_error": f"{type(e).__name__}: {e}",
            "outcome": f"checkpoint {root / tag} is committed and complete, but 'latest' still "
            f"names {previous!r}; load it with tag={tag!r}",
        }
    return {}


def _prune(root: Path, keep_last: int, tag: str) -> None:
    """Apply ``keep_last`` after a committed save: problems only warn (the save succeeded)."""
    try:
        apply_retention(root, keep_last, protect=[tag])
    except Exception as e:  # noqa: BLE001 - the new checkpoint is committed; old ones linger
        warnings.warn(
            f"keep_last={keep_last}: could not delete old checkpoints in {root} "
            f"({type(e).__name__}: {e}); the new checkpoint {tag!r} is saved and 'latest' names it",
            stacklevel=3,
        )
