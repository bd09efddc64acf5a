"""One tensor of a checkpoint: its leaf's layout, its dtype and where its values are stored.

:class:`TensorEntry` is the only description of a leaf in :mod:`funczero.checkpoint`. Saving
builds one per leaf of the state from the :class:`~funczero.train.state.LeafLayout` the state
recorded when it was built, plus the leaf's path and dtype (:func:`state_entries`); nothing is
guessed from paths or shapes. Reading builds them from ``index.json``
(:meth:`TensorEntry.from_json`, through :func:`~funczero.checkpoint.index.read_index`), with
the :class:`Chunk` list saying where the values are.

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
from collections.abc import Collection, Mapping
from typing import Any

import torch

from funczero import tree
from funczero.checkpoint.format import (
    DTYPE_NAMES,
    KINDS,
    LAYOUTS,
    dtype_from_name,
    dtype_name,
    shard_file_name,
)
from funczero.checkpoint.schema import SHA256_RE, Schema, as_shape, show
from funczero.parallel.sharding import ShardSpec
from funczero.train.state import LeafLayout, TrainState

__all__ = ["Chunk", "TensorEntry", "state_entries"]

_HEADS = {"param": "params/", "master": "master/", "buffer": "buffers/"}
"""Kinds whose path is ``<head><module FQN>`` (consolidate turns the FQN into the key)."""


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

    @classmethod
    def from_json(
        cls,
        path: str,
        raw: Any,
        shapes: Mapping[str, tuple[int, ...]],
        files: Collection[str],
        world_size: int,
        schema: Schema,
    ) -> TensorEntry:
        """The entry ``tensors[path]`` of an index, validated (see ``docs/checkpoint-format.md``).

        Args:
            raw: the JSON value.
            shapes: ``params.shapes`` of the index (validated).
            files: the shard file names of the index (validated).
            world_size: the index's world size.
            schema: reports failures as a malformed index.
        """
        ctx = f"tensors[{show(path)}]"
        if not isinstance(raw, dict):
            raise schema.fail(f"{ctx} must be an object")
        layout = _layout_from_json(path, raw, shapes, schema)
        dtype = schema.get(raw, "dtype", str, ctx)
        if dtype not in DTYPE_NAMES:
            raise schema.fail(f"{ctx}.dtype={show(dtype)} is not one of {sorted(DTYPE_NAMES)}")
        entry = cls(path, layout, dtype_from_name(dtype))
        if "alias_of" in raw:
            alias = raw["alias_of"]
            if not isinstance(alias, str) or "chunks" in raw:
                raise schema.fail(f"{ctx}.alias_of must be a tensor path, with no chunks")
            return dataclasses.replace(entry, alias_of=alias)
        chunks = _chunks_from_json(
            entry, schema.get(raw, "chunks", list, ctx), files, world_size, schema
        )
        return dataclasses.replace(entry, chunks=chunks)


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


def _layout_from_json(
    path: str, raw: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], schema: Schema
) -> LeafLayout:
    ctx = f"tensors[{show(path)}]"
    group = schema.get(raw, "group", str, ctx)
    kind = schema.get(raw, "kind", str, ctx)
    placement = schema.get(raw, "layout", str, ctx)
    param = raw.get("param")
    if kind not in KINDS or placement not in LAYOUTS:
        raise schema.fail(f"{ctx}: kind/layout {show(kind)}/{show(placement)} not known")
    shape = as_shape(raw.get("shape"))
    if shape is None:
        raise schema.fail(f"{ctx}.shape={show(raw.get('shape'))} is not a list of sizes")
    if param is not None and (not isinstance(param, str) or param not in shapes):
        raise schema.fail(f"{ctx}.param={show(param)} is not a parameter in params.shapes")
    layout = LeafLayout(kind, placement, param, shape)  # type: ignore[arg-type]
    if group != layout.group:
        raise schema.fail(f"{ctx}: group {show(group)} does not hold {kind} tensors")
    head = _HEADS.get(kind)
    if head is not None and (not path.startswith(head) or len(path) == len(head)):
        raise schema.fail(f"{ctx}: a {kind} tensor's path must be '{head}<name>'")
    if placement == "shard" and param is None:
        raise schema.fail(f"{ctx}: a shard tensor needs the parameter it follows (param)")
    # The parameter a leaf belongs to fixes its global shape (per_rank leaves have their own).
    owner = param or (path[len(head) :] if head and kind != "buffer" else None)
    if placement != "per_rank" and owner is not None and shapes.get(owner) != shape:
        raise schema.fail(
            f"{ctx}.shape={list(shape)}, but parameter {show(owner)} has shape "
            f"{show(shapes.get(owner) and list(shapes[owner]))} in params.shapes"
        )
    return layout


def _chunk_from_json(
    c: Any, cctx: str, files: Collection[str], world: int, schema: Schema
) -> Chunk:
    if not isinstance(c, dict):
        raise schema.fail(f"{cctx} must be an object")
    file = schema.get(c, "file", str, cctx)
    if file not in files:
        raise schema.fail(f"{cctx}.file={show(file)} is not listed in files")
    sha = schema.get(c, "sha256", str, cctx)
    if not SHA256_RE.fullmatch(sha):
        raise schema.fail(f"{cctx}.sha256 is not a sha256 hex digest")
    rank = c.get("rank")
    if rank is not None and (type(rank) is not int or not 0 <= rank < world):
        raise schema.fail(f"{cctx}.rank must be a rank of the world size {world}")
    start, stop = schema.get_int(c, "start", cctx), schema.get_int(c, "stop", cctx)
    return Chunk(file, schema.get(c, "key", str, cctx), start, stop, sha, rank)


def _chunks_from_json(
    entry: TensorEntry, raw: list[Any], files: Collection[str], world: int, schema: Schema
) -> tuple[Chunk, ...]:
    """The chunks of ``entry``: exactly those ``world`` ranks store (:meth:`stored_ranges`)."""
    ctx = f"tensors[{show(entry.path)}]"
    # More than any valid tensor has are refused below, without parsing them all.
    chunks = [
        _chunk_from_json(c, f"{ctx}.chunks[{i}]", files, world, schema)
        for i, c in enumerate(raw[: world + 1])
    ]
    if entry.placement != "per_rank":
        pos = 0
        for c in chunks:
            if c.start != pos or c.stop <= c.start:
                raise schema.fail(
                    f"{ctx}: chunks must tile [0, {entry.numel}) in order; chunk "
                    f"[{c.start}, {c.stop}) does not start at {pos}"
                )
            pos = c.stop
        if pos != entry.numel:
            raise schema.fail(
                f"{ctx}: chunks cover [0, {pos}) but the tensor has {entry.numel} elements"
            )
    want = entry.stored_ranges(world)
    if len(raw) != len(want):
        raise schema.fail(
            f"{ctx}: {len(raw)} chunks; a {entry.placement} tensor of {entry.numel} elements at "
            f"world size {world} is stored in {len(want)}"
        )
    per_rank = entry.placement == "per_rank"
    for c, (r, start, stop) in zip(chunks, want):
        file = shard_file_name(entry.group, r, world)
        if c != Chunk(file, entry.path, start, stop, c.sha256, r if per_rank else None):
            raise schema.fail(
                f"{ctx}: chunk {c.file}[{show(c.key)}] [{c.start}, {c.stop}) should be "
                f"{file}[{entry.path!r}] [{start}, {stop})"
                + (f" of rank {r}" if per_rank else "")
                + ": each rank stores its own part of the tensor, under its path, exactly once"
            )
    return tuple(chunks)
