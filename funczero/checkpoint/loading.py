"""``load``: read a checkpoint into the layout of a ``like`` state, at any world size and stage.

Every rank reads, for each leaf, exactly the flat element range its layout needs, straight
from the files' byte ranges into the destination tensor (no rank reads what another needs,
nothing goes through rank 0). Same world size: each rank reads its own chunks. Otherwise the
ranges are cut out of whichever saved chunks overlap them, so resharding happens online for
every optimizer's state (leaves are matched by path, not by optimizer type).

The destination is a new state, or with ``donate=True`` the ``like`` state's own tensors
(resume in place: the memory of one state, not two).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from funczero import tree
from funczero.checkpoint import comm
from funczero.checkpoint.chunks import find_aliases
from funczero.checkpoint.entry import TensorEntry, state_entries
from funczero.checkpoint.errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from funczero.checkpoint.index import Index, read_index
from funczero.checkpoint.reader import ShardReader, derive_rng
from funczero.checkpoint.tags import resolve
from funczero.parallel.precision import Precision
from funczero.train.state import TrainState

__all__ = ["load"]


def _check(
    index: Index, like: TrainState, wanted: list[tuple[TensorEntry, torch.Tensor]], where: str
) -> None:
    lay = like.layout
    saved = index.tensors
    paths = {w.path for w, _ in wanted}
    missing = [w.path for w, _ in wanted if w.path not in saved]
    unexpected = [p for p in saved if p not in paths]
    bad: list[str] = []
    if index.precision != lay.precision:
        bad.append(
            f"precision: the checkpoint is {index.precision}, the state {lay.precision}; "
            f"build the state with precision {index.precision}"
        )
    compute = Precision.from_name(index.precision).compute_dtype
    same_world = index.world_size == lay.world_size
    for want, leaf in wanted:
        e = saved.get(want.path)
        if e is None:
            continue
        if want.kind == "rng":  # any shape: restored exactly when it fits, else re-derived
            if e.placement != "per_rank":
                bad.append(f"{want.path}: saved as a {e.placement} tensor, not per rank")
            continue
        if e.shape != want.shape:
            bad.append(
                f"{want.path}: shape {list(e.shape)} in the checkpoint, "
                f"{list(want.shape)} in the state"
            )
            continue
        if leaf.dtype != e.dtype and not (
            want.kind == "param" and {e.dtype, leaf.dtype} <= {torch.float32, compute}
        ):
            bad.append(
                f"{want.path}: dtype {e.dtype_name} in the checkpoint, {leaf.dtype} in the state"
            )
        if e.placement == "per_rank" and want.placement != "per_rank":
            bad.append(f"{want.path}: saved per rank, cannot be read as a {want.placement} tensor")
        elif e.placement == "per_rank" and not same_world:
            bad.append(
                f"{want.path}: saved per rank at world size {index.world_size}; it cannot be "
                f"resharded to {lay.world_size} ranks"
            )
    if missing or unexpected or bad:
        raise StateMismatchError(
            missing=missing, unexpected=unexpected, mismatched=bad, where=where
        )


def _plan(
    index: Index, wanted: list[tuple[TensorEntry, torch.Tensor]], alias_of: dict[str, str]
) -> list[tuple[TensorEntry, torch.Tensor, TensorEntry]]:
    """``(wanted, leaf, saved)`` of every leaf to read (aliases share their owner's tensor)."""
    return [(w, leaf, index.tensors[w.path]) for w, leaf in wanted if w.path not in alias_of]


def _source(
    want: TensorEntry, saved: TensorEntry, leaf: torch.Tensor, index: Index, like: TrainState
) -> tuple[str, int, int]:
    """Where a leaf's values come from: ``("range", a, b)`` of the saved tensor's elements,
    ``("rank", r, 0)`` rank ``r``'s own copy, or ``("derive", 0, 0)`` a re-derived RNG."""
    lay = like.layout
    if want.placement == "shard":
        return ("range", *want.spec(lay.world_size).bounds(lay.rank))
    if want.placement == "replicated" or saved.placement != "per_rank":
        return "range", 0, saved.numel
    if (
        index.world_size == lay.world_size
        and saved.shape == tuple(leaf.shape)
        and saved.dtype == leaf.dtype
    ):
        return "rank", lay.rank, 0
    return "derive", 0, 0  # the RNG at a new world size, or of another shape (others refused)


def _check_files(
    reader: ShardReader,
    plan: list[tuple[TensorEntry, torch.Tensor, TensorEntry]],
    like: TrainState,
) -> None:
    """Open every file the load needs and check it against the index, before any byte is
    written: only checksum mismatches and I/O errors can then stop a load mid-way."""
    for want, leaf, saved in plan:
        how, x, y = _source(want, saved, leaf, reader.index, like)
        if how == "range":
            reader.check_range(saved, x, y)
        else:
            reader.check_rank(reader.index.resolve(saved), x)


def _fill(
    reader: ShardReader,
    want: TensorEntry,
    saved: TensorEntry,
    target: torch.Tensor,
    like: TrainState,
) -> None:
    """Read a leaf's values into ``target`` (its tensor, contiguous, of the leaf's shape)."""
    flat = target.view(-1)
    how, a, b = _source(want, saved, target, reader.index, like)
    if how == "range":
        reader.read_range(saved, a, b, flat[: b - a])
        flat[b - a :].zero_()  # a shard's padding
        return
    saved = reader.index.resolve(saved)
    if how == "rank":
        value = reader.read_rank(saved, a)
    else:
        value = derive_rng(reader.read_rank(saved, 0), like.layout.rank, target)
    flat.copy_(value.reshape(-1))


def load(
    directory: str | os.PathLike[str],
    like: TrainState,
    *,
    tag: str | None = None,
    verify: bool = True,
    donate: bool = False,
) -> tuple[TrainState, Any]:
    """Read a checkpoint into a state laid out like ``like``: new tensors, or ``like``'s own.

    Every rank calls it (no communication: each rank reads only what its layout needs).
    ``like`` gives the structure, the world size, rank and ZeRO stage to load into (they may
    differ from the saved ones). Aliasing is restored: wherever ``like.params[n] is
    like.master[n]``, so is the result's.

    Args:
        directory: checkpoint root (or a tag directory).
        like: a state of the target layout (e.g. fresh from :func:`funczero.initialize`).
        tag: which checkpoint; default: the one ``latest`` names (missing ``latest`` is an
            error, never a silent fresh start).
        verify: check the SHA-256 of every chunk read whole (all of them at the saved world
            size), hashing on helper threads while reading; ranges read in part are only
            checked by :func:`verify`.
        donate: read into ``like``'s own tensors and mark ``like`` donated (as a donating
            ``train_step`` does: using it raises :class:`~funczero.DonatedStateError`); the
            returned state shares its tensors. Memory: the state plus two staging blocks of
            :data:`~funczero.checkpoint.reader.LOAD_BLOCK_BYTES` (none for CPU tensors of the
            saved dtype), instead of a second state. Every file is opened and checked against
            the index first, so a missing, truncated or foreign file, or a checkpoint that does
            not fit ``like``, raises with ``like`` untouched. A chunk found damaged while
            reading (checksums are checked as the bytes arrive, not before) leaves ``like``
            partially overwritten: it is marked donated and the
            :class:`~funczero.checkpoint.CorruptCheckpointError` says so. The checkpoint's files
            are only ever read. Default: new tensors, ``like`` unchanged.

    Returns:
        ``(state, client_state)``. At the saved world size each rank gets the client state it
        saved; otherwise rank 0's. The RNG is restored exactly at the saved world size, and
        otherwise re-derived deterministically per rank
        (:func:`~funczero.checkpoint.reader.derive_rng`).

    Example:
        >>> import tempfile
        >>> from funczero.checkpoint import save, load
        >>> from funczero.testing.states import toy_state
        >>> root = tempfile.mkdtemp()
        >>> _ = save(root, toy_state(stage=0))
        >>> state, _ = load(root, like=toy_state(stage=3, seed=5))
        >>> state.params["w"] is state.master["w"]
        True
        >>> old = toy_state(seed=5)
        >>> resumed, _ = load(root, like=old, donate=True)  # into old's tensors: no 2nd state
        >>> old.donated, torch.equal(resumed.master["w"], toy_state().master["w"])
        (True, True)
    """
    lay = like.layout
    comm.check_world(lay.world_size, lay.rank, need_group=False)
    tag_dir = resolve(directory, tag)
    index = read_index(tag_dir)
    wanted = state_entries(like)
    _check(index, like, wanted, str(tag_dir))
    alias_of = find_aliases(wanted)
    plan = _plan(index, wanted, alias_of)
    structure = tree.structure(like)
    values: dict[str, torch.Tensor] = {}
    started = False
    try:
        with ShardReader(tag_dir, index, verify=verify) as reader:
            _check_files(reader, plan, like)
            started = donate
            for want, leaf, saved in plan:
                values[want.path] = _read_leaf(reader, want, saved, leaf, like, donate=donate)
            reader.finish()
    except BaseException as e:
        if not started:
            raise
        like.mark_donated()
        error = _partial(e, tag_dir)
        if error is e:
            raise
        raise error from e
    if donate:
        like.mark_donated()
    leaves = [values[alias_of.get(w.path, w.path)] for w, _ in wanted]
    state = tree.unflatten(structure, leaves)
    per_rank = index.client_state_per_rank
    if per_rank is not None and index.world_size == lay.world_size:
        return state, per_rank[lay.rank]
    return state, index.client_state


def _read_leaf(
    reader: ShardReader,
    want: TensorEntry,
    saved: TensorEntry,
    leaf: torch.Tensor,
    like: TrainState,
    *,
    donate: bool,
) -> torch.Tensor:
    """The leaf's loaded tensor: ``leaf`` itself when donating, else a new one."""
    if donate and leaf.is_contiguous():
        _fill(reader, want, saved, leaf.detach(), like)  # detach: its memory, never autograd's
        return leaf
    out = torch.empty(leaf.shape, dtype=leaf.dtype, device=leaf.device)
    _fill(reader, want, saved, out, like)
    if donate:  # a strided leaf (rare): read whole, then copied into place
        leaf.detach().copy_(out)
        return leaf
    return out


_PARTIAL = (
    "the state passed as like= (donate=True) was partially overwritten and is now marked "
    "donated: do not use it. Build a fresh state (e.g. with funczero.initialize) and load "
    "another tag, or this one once it is repaired; the checkpoint's files were only read"
)


def _partial(error: BaseException, tag_dir: object) -> BaseException:
    """``error`` of a donating load that failed after writing began, saying so."""
    if isinstance(error, CorruptCheckpointError):
        return CorruptCheckpointError([*error.problems, _PARTIAL], where=str(tag_dir))
    if isinstance(error, Exception):
        return CheckpointError(
            f"loading {tag_dir} failed ({type(error).__name__}: {error}); {_PARTIAL}"
        )
    error.add_note(_PARTIAL)  # KeyboardInterrupt...: keep its type
    return error
