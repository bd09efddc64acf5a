"""One tensor of a checkpoint: its leaf's layout, its dtype and where its values are stored.

:class:`TensorEntry` is the only description of a leaf in :mod:`funczero.checkpoint`. Saving
builds one per leaf of the state from the :class:`~funczero.train.state.LeafLayout` the state
recorded when it was built, plus the leaf's path and dtype (:func:`state_entries`); nothing is
guessed from paths or shapes. Reading builds them from ``index.json``
(:func:`~funczero.checkpoint.index.read_index`), with the :class:`Chunk` list saying where the
values are.

Example:
    >>> from funczero.testing.states import toy_state
    >>> entries = {e.path: e for e, _ in state_entries(toy_state(world_size=2, rank=1, stage=1))}
    >>> e = entries["master/b"]
    >>> e.placement, e.param, e.shape, e.dtype_name
    ('shard', 'b', (7,), 'float32')
    >>> e.stored_ranges(world_size=2)
    [(0, 0, 4), (1, 4, 7)]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from funczero import tree
from funczero.checkpoint.format import dtype_name
from funczero.parallel.sharding import ShardSpec
from funczero.train.state import LeafLayout, TrainState

__all__ = ["Chunk", "TensorEntry", "state_entries"]


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
    """One leaf of a saved (or to be saved) state.

    Attributes:
        path: leaf path (``opt_state/0/mu/blocks.0.fc.weight``).
        layout: the leaf's layout, as the state recorded it (kind, placement, parameter,
            global shape).
        dtype: the leaf's dtype.
        chunks: where the values are stored (see :class:`Chunk`); empty before saving and for
            aliases.
        alias_of: path of the entry whose values this leaf shares (the same tensor object in
            the saved state, e.g. ``params/w`` -> ``master/w`` at stage 3), else ``None``.
    """

    path: str
    layout: LeafLayout
    dtype: torch.dtype
    chunks: tuple[Chunk, ...] = ()
    alias_of: str | None = None

    @property
    def kind(self) -> str:
        """``param``, ``master``, ``moment``, ``optim``, ``buffer``, ``scalar`` or ``rng``."""
        return self.layout.kind

    @property
    def placement(self) -> str:
        """``shard``, ``replicated`` or ``per_rank`` (see :data:`funczero.train.state.Placement`)."""
        return self.layout.placement

    @property
    def param(self) -> str | None:
        """The parameter whose :class:`ShardSpec` a ``shard`` leaf follows, else ``None``."""
        return self.layout.param

    @property
    def shape(self) -> tuple[int, ...]:
        """Global shape (``per_rank``: each rank's shape)."""
        return self.layout.shape

    @property
    def group(self) -> str:
        """Which files hold the chunks: ``model`` (params, master, buffers) or ``optim``."""
        return self.layout.group

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def dtype_name(self) -> str:
        """The index's name of the dtype (``float32``...)."""
        return dtype_name(self.dtype)

    def spec(self, world_size: int) -> ShardSpec:
        """How ``world_size`` ranks split this tensor (its parameter's split for a shard)."""
        return ShardSpec(self.param or self.path, torch.Size(self.shape), world_size)

    def stored_ranges(self, world_size: int) -> list[tuple[int, int, int]]:
        """``(rank, start, stop)`` of every chunk ``world_size`` ranks store, in rank order.

        ``shard`` and ``replicated`` tensors: each rank's unpadded ``ShardSpec.bounds(rank)``,
        empty ones left out. ``per_rank``: every rank stores its whole tensor.
        """
        if self.placement == "per_rank":
            return [(r, 0, self.numel) for r in range(world_size)]
        spec = self.spec(world_size)
        # Only the first ceil(numel / shard_numel) ranks hold anything: never loop over the
        # empty rest (there may be many ranks and few elements).
        holders = min(world_size, -(-spec.numel // spec.shard_numel)) if spec.numel else 0
        return [(r, *spec.bounds(r)) for r in range(holders)]

    def to_json(self) -> dict[str, Any]:
        """The entry as ``index.json`` stores it (see ``docs/checkpoint-format.md``)."""
        out: dict[str, Any] = {
            "group": self.group,
            "kind": self.kind,
            "layout": self.placement,
            "param": self.param,
            "shape": list(self.shape),
            "dtype": self.dtype_name,
        }
        if self.alias_of is not None:
            out["alias_of"] = self.alias_of
        else:
            out["chunks"] = [c.to_json() for c in self.chunks]
        return out


def state_entries(state: TrainState) -> list[tuple[TensorEntry, torch.Tensor]]:
    """``(entry, leaf)`` for every leaf of ``state`` in flatten order, from its recorded layout.

    Raises:
        TypeError: a leaf is not a tensor.
        KeyError: a leaf has no recorded layout (the state's structure was changed after it
            was built).
    """
    recorded = state.layout.leaf_map()
    out = []
    for path, leaf in tree.leaves_with_path(state):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"state leaf {path!r} is a {type(leaf).__name__}, not a tensor; a TrainState "
                "holds only tensors (numbers that change belong in 0-d tensors)"
            )
        layout = recorded.get(path)
        if layout is None:
            raise KeyError(
                f"state leaf {path!r} has no recorded layout: the state's structure differs from "
                "the one it was built with (build states with init_state or TrainState.create)"
            )
        out.append((TensorEntry(path, layout, leaf.dtype), leaf))
    return out
