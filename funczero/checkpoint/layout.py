"""How each leaf of a :class:`~funczero.train.state.TrainState` is laid out, and the resharding math.

Every leaf is one of three layouts in the *state*:

* ``shard``: rank ``r`` holds elements ``ShardSpec(param, shape, W).bounds(r)`` of the
  flattened tensor, zero-padded to ``shard_numel`` (1-D);
* ``replicated``: every rank holds the full tensor (identical values);
* ``per_rank``: every rank holds its own, different tensor (the RNG state).

On *disk* shard and replicated leaves are stored the same way: rank ``r`` writes the unpadded
1-D chunk ``bounds(r)`` of the flattened global tensor (a replicated tensor is thus written
once in total, split across ranks, with no funnel through rank 0). Reading any layout at any
world size is then slicing flat element ranges out of those chunks.

Example:
    >>> chunk_bounds(10, world_size=4, rank=3)
    (9, 10)
    >>> list(overlaps([(0, 3), (3, 6), (6, 9), (9, 10)], 2, 7))
    [(0, 2, 3), (1, 3, 6), (2, 6, 7)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import optree
import torch

from funczero import tree
from funczero.parallel.sharding import ShardSpec
from funczero.train.state import StateLayout, TrainState

__all__ = [
    "LeafPlan",
    "chunk_bounds",
    "find_aliases",
    "local_chunk",
    "named_leaves",
    "overlaps",
    "plan_leaf",
    "plan_state",
]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """Where a leaf lives and how it is laid out.

    Attributes:
        path: leaf path (``opt_state/0/mu/w``).
        group: file group, ``model`` (params, master, buffers) or ``optim`` (the rest).
        kind: ``param``, ``master``, ``moment``, ``optim``, ``buffer``, ``scalar`` or ``rng``.
        layout: ``shard``, ``replicated`` or ``per_rank``.
        param: the parameter whose :class:`ShardSpec` the leaf follows (``shard``), else None.
        shape: global shape (``per_rank``: this rank's shape).
        dtype: dtype of the leaf.
    """

    path: str
    group: str
    kind: str
    layout: str
    param: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def chunk_bounds(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """Flat range ``[start, stop)`` of a ``numel``-element tensor stored by ``rank``.

    The same split as :meth:`ShardSpec.bounds`: ``ceil(numel / world_size)`` per rank, the
    last ranks possibly short or empty.
    """
    per = -(-numel // world_size)
    start = min(rank * per, numel)
    return start, min(start + per, numel)


def overlaps(ranges: Sequence[tuple[int, int]], a: int, b: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(i, lo, hi)`` for each sorted range ``i`` overlapping ``[a, b)`` in ``[lo, hi)``."""
    for i, (s, e) in enumerate(ranges):
        lo, hi = max(a, s), min(b, e)
        if lo < hi:
            yield i, lo, hi


def plan_leaf(path: str, leaf: torch.Tensor, layout: StateLayout) -> LeafPlan:
    """Classify one leaf of a state with ``layout`` (see the module docstring)."""
    head, _, rest = path.partition("/")
    last = path.rsplit("/", 1)[-1]
    shapes = dict(layout.shapes)
    shape = tuple(leaf.shape)
    dtype = leaf.dtype
    trainable = set(layout.trainable)

    def per_param(name: str, sharded: bool, kind: str, group: str) -> LeafPlan | None:
        if name not in shapes:
            return None
        full = tuple(shapes[name])
        if sharded:
            spec = ShardSpec(name, torch.Size(full), layout.world_size)
            if shape == (spec.shard_numel,):
                return LeafPlan(path, group, kind, "shard", name, full, dtype)
        elif shape == full:
            return LeafPlan(path, group, kind, "replicated", None, full, dtype)
        return None

    plan: LeafPlan | None = None
    if head == "params" and rest:
        plan = per_param(rest, rest in layout.sharded_params, "param", "model")
    elif head == "master" and rest:
        plan = per_param(rest, layout.master_sharded, "master", "model")
    elif head == "opt_state":
        if last in trainable:
            plan = per_param(last, layout.master_sharded, "moment", "optim")
        if plan is None and (last not in trainable or not layout.master_sharded):
            plan = LeafPlan(path, "optim", "optim", "replicated", None, shape, dtype)
    elif head == "buffers":
        plan = LeafPlan(path, "model", "buffer", "replicated", None, shape, dtype)
    elif head == "rng":
        plan = LeafPlan(path, "optim", "rng", "per_rank", None, shape, dtype)
    elif head in ("step", "skipped", "loss_scale"):
        plan = LeafPlan(path, "optim", "scalar", "replicated", None, shape, dtype)
    if plan is None:
        # A per-parameter leaf whose shape is neither the parameter's nor its shard (e.g. a
        # factored second moment under ZeRO): kept exactly per rank; it cannot be resharded.
        group = "model" if head in ("params", "master", "buffers") else "optim"
        kind = {"params": "param", "master": "master", "opt_state": "moment"}.get(head, "optim")
        plan = LeafPlan(path, group, kind, "per_rank", None, shape, dtype)
    return plan


def _entry_name(entry: Any) -> str:
    if isinstance(entry, (optree.NamedTupleEntry, optree.StructSequenceEntry)):
        return str(entry.field)
    if isinstance(entry, optree.GetAttrEntry):
        return str(entry.name)
    if isinstance(entry, optree.MappingEntry):
        return str(entry.key)
    if isinstance(entry, optree.SequenceEntry):
        return str(entry.index)
    return str(entry.entry)


def named_leaves(obj: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` in flatten order, NamedTuple fields by name (``opt_state/0/mu/w``).

    Field names rather than positions make checkpoint paths readable and stable when an
    optimizer state gains a field.
    """
    accessors, leaves, _ = optree.tree_flatten_with_accessor(obj, namespace=tree.NAMESPACE)
    return [("/".join(_entry_name(e) for e in acc), leaf) for acc, leaf in zip(accessors, leaves)]


def plan_state(state: TrainState) -> list[tuple[LeafPlan, torch.Tensor]]:
    """Describe every leaf of ``state`` from its recorded layout, in flatten order."""
    recorded = state.layout.leaf_map()
    out = []
    for path, leaf in named_leaves(state):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"state leaf {path!r} is a {type(leaf).__name__}, not a tensor; a TrainState "
                "holds only tensors (numbers that change belong in 0-d tensors)"
            )
        lay = recorded.get(path)
        if lay is None:
            raise KeyError(
                f"state leaf {path!r} has no recorded layout: the state's structure differs from "
                "the one it was built with (build states with init_state or TrainState.create)"
            )
        out.append((LeafPlan(path, lay.group, lay.kind, lay.placement, lay.param, lay.shape, leaf.dtype), leaf))
    return out


def local_chunk(plan: LeafPlan, leaf: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """The 1-D piece of ``leaf`` this rank stores: its unpadded chunk, or all of it (per_rank)."""
    flat = leaf.detach().reshape(-1)
    if plan.layout == "per_rank":
        return flat
    start, stop = chunk_bounds(plan.numel, world_size, rank)
    if plan.layout == "shard":
        return flat[: stop - start]
    return flat[start:stop]


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0:
        return None
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def find_aliases(plans: list[tuple[LeafPlan, torch.Tensor]]) -> dict[str, str]:
    """Leaves that are the same tensor as another leaf: path -> stored path (master preferred)."""
    groups: dict[Any, list[str]] = {}
    for plan, leaf in plans:
        key = _storage_key(leaf)
        if key is not None:
            groups.setdefault(key, []).append(plan.path)
    out: dict[str, str] = {}
    for paths in groups.values():
        if len(paths) > 1:
            owner = next((p for p in paths if p.startswith("master/")), paths[0])
            out.update({p: owner for p in paths if p != owner})
    return out


def optimizer_name(opt_state: Any) -> str:
    """Human name of an optimizer state: its NamedTuple types, outermost first."""
    names: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            names.append(type(x).__name__)
            for v in x:
                walk(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(opt_state)
    return ", ".join(dict.fromkeys(n for n in names if n != "EmptyState")) or "none"
