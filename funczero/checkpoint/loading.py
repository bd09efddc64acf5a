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
from funczero.checkpoint.errors import StateMismatchError
from funczero.checkpoint.format import dtype_name
from funczero.checkpoint.index import Index, TensorEntry, read_index
from funczero.checkpoint.layout import LeafPlan, find_aliases, plan_state
from funczero.checkpoint.reader import ShardReader, derive_rng
from funczero.checkpoint.tags import resolve
from funczero.parallel.sharding import ShardSpec
from funczero.parallel.precision import Precision
from funczero.train.state import TrainState

__all__ = ["load"]


def _check(
    index: Index, like: TrainState, plans: list[tuple[LeafPlan, torch.Tensor]], where: str
) -> None:
    lay = like.layout
    saved = index.tensors
    paths = {p.path for p, _ in plans}
    missing = [p.path for p, _ in plans if p.path not in saved]
    unexpected = [p for p in saved if p not in paths]
    bad: list[str] = []
    if index.precision != lay.precision:
        bad.append(
            f"precision: the checkpoint is {index.precision}, the state {lay.precision}; "
            f"build the state with precision {index.precision}"
        )
    compute = Precision.from_name(index.precision).compute_dtype
    same_world = index.world_size == lay.world_size
    for plan, leaf in plans:
        e = saved.get(plan.path)
        if e is None:
            continue
        if plan.kind == "rng":
            continue  # any shape: restored exactly when it fits, else re-derived
        if tuple(e.shape) != plan.shape:
            bad.append(
                f"{plan.path}: shape {list(e.shape)} in the checkpoint, "
                f"{list(plan.shape)} in the state"
            )
            continue
        dtypes = {e.torch_dtype, leaf.dtype}
        if leaf.dtype != e.torch_dtype and not (
            plan.kind == "param" and dtypes <= {torch.float32, compute}
        ):
            bad.append(f"{plan.path}: dtype {e.dtype} in the checkpoint, {leaf.dtype} in the state")
        if e.layout == "per_rank" and plan.layout != "per_rank":
            bad.append(f"{plan.path}: saved per rank, cannot be read as a {plan.layout} tensor")
        elif e.layout == "per_rank" and not same_world:
            bad.append(
                f"{plan.path}: saved per rank at world size {index.world_size}; it cannot be "
                f"resharded to {lay.world_size} ranks"
            )
    if missing or unexpected or bad:
        raise StateMismatchError(
            missing=missing, unexpected=unexpected, mismatched=bad, where=where
        )


def _materialise(
    reader: ShardReader, plan: LeafPlan, leaf: torch.Tensor, entry: TensorEntry, like: TrainState
) -> torch.Tensor:
    lay = like.layout
    world, rank = lay.world_size, lay.rank
    if plan.layout == "shard":
        assert plan.param is not None
        spec = ShardSpec(plan.param, torch.Size(plan.shape), world)
        out = torch.zeros(spec.shard_numel, dtype=leaf.dtype)
        a, b = spec.bounds(rank)
        reader.read_range(entry, a, b, out[: b - a])
    elif plan.layout == "replicated" or entry.layout != "per_rank":
        out = reader.read_full(entry, leaf.dtype).reshape(plan.shape)
    elif (
        reader.index.world_size == world
        and entry.shape == plan.shape
        and entry.dtype == dtype_name(leaf.dtype)
    ):
        out = reader.read_rank(entry, rank)
    else:  # the RNG at a new world size (other per-rank leaves were refused in _check)
        out = derive_rng(reader.read_rank(entry, 0), rank, leaf)
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
    plans = plan_state(like)
    _check(index, like, plans, str(tag_dir))
    alias_of = find_aliases(plans)
    values: dict[str, torch.Tensor] = {}
    with ShardReader(tag_dir, index, verify=verify) as reader:
        for plan, leaf in plans:
            if plan.path not in alias_of:
                values[plan.path] = _materialise(reader, plan, leaf, index.tensors[plan.path], like)
    leaves = [values[alias_of.get(p.path, p.path)] for p, _ in plans]
    state = tree.unflatten(tree.structure(like), leaves)
    per_rank: Any = index.raw.get("client_state_per_rank")
    if (
        isinstance(per_rank, list)
        and index.world_size == lay.world_size
        and len(per_rank) > lay.rank
    ):
        return state, per_rank[lay.rank]
    return state, index.client_state
