"""``load``: read a checkpoint into the layout of a ``like`` state, at any world size and stage.

Every rank reads, for each leaf, exactly the flat element range its layout needs, straight
from the files' byte ranges into the new tensor (no rank reads what another needs, nothing
goes through rank 0). Same world size: each rank reads its own chunks. Otherwise the ranges
are cut out of whichever saved chunks overlap them, so resharding happens online for every
optimizer's state (leaves are matched by path, not by optimizer type).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from funczero import tree
from funczero.checkpoint import comm
from funczero.checkpoint.chunks import find_aliases
from funczero.checkpoint.entry import TensorEntry, state_entries
from funczero.checkpoint.errors import StateMismatchError
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


def _materialise(
    reader: ShardReader, want: TensorEntry, leaf: torch.Tensor, saved: TensorEntry, like: TrainState
) -> torch.Tensor:
    lay = like.layout
    world, rank = lay.world_size, lay.rank
    if want.placement == "shard":
        spec = want.spec(world)
        out = torch.zeros(spec.shard_numel, dtype=leaf.dtype)
        a, b = spec.bounds(rank)
        reader.read_range(saved, a, b, out[: b - a])
    elif want.placement == "replicated" or saved.placement != "per_rank":
        out = reader.read_full(saved, leaf.dtype).reshape(want.shape)
    elif (
        reader.index.world_size == world
        and saved.shape == tuple(leaf.shape)
        and saved.dtype == leaf.dtype
    ):
        out = reader.read_rank(saved, rank)
    else:  # the RNG at a new world size, or of another shape (other per-rank leaves were refused)
        out = derive_rng(reader.read_rank(saved, 0), rank, leaf)
    return out.to(leaf.device)


def load(
    directory: str | os.PathLike[str],
    like: TrainState,
    *,
    tag: str | None = None,
    verify: bool = True,
) -> tuple[TrainState, Any]:
    """Read a checkpoint into a new state laid out like ``like``.

    Every rank calls it. ``like`` gives the structure, the world size, rank and ZeRO stage to
    load into (they may differ from the saved ones); its values are not used and it is not
    modified. Aliasing is restored: wherever ``like.params[n] is like.master[n]``, so is the
    result's.

    Args:
        directory: checkpoint root (or a tag directory).
        like: a state of the target layout (e.g. fresh from :func:`funczero.initialize`).
        tag: which checkpoint; default: the one ``latest`` names (missing ``latest`` is an
            error, never a silent fresh start).
        verify: check the SHA-256 of every chunk read whole (all of them at the saved world
            size); ranges read in part are only checked by :func:`verify`.

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
    """
    lay = like.layout
    comm.check_world(lay.world_size, lay.rank, need_group=False)
    tag_dir = resolve(directory, tag)
    index = read_index(tag_dir)
    wanted = state_entries(like)
    _check(index, like, wanted, str(tag_dir))
    alias_of = find_aliases(wanted)
    values: dict[str, torch.Tensor] = {}
    with ShardReader(tag_dir, index, verify=verify) as reader:
        for want, leaf in wanted:
            if want.path not in alias_of:
                saved = index.tensors[want.path]
                values[want.path] = _materialise(reader, want, leaf, saved, like)
    leaves = [values[alias_of.get(w.path, w.path)] for w, _ in wanted]
    state = tree.unflatten(tree.structure(like), leaves)
    per_rank = index.client_state_per_rank
    if per_rank is not None and index.world_size == lay.world_size:
        return state, per_rank[lay.rank]
    return state, index.client_state
