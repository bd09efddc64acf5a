"""Building the ``index.json`` of a save from the state and what every rank wrote.

Rank 0 calls :func:`build_index` once every rank has reported its files (names, sizes,
checksums of each chunk); nothing here touches the disk.

Example:
    >>> from funczero.testing.states import toy_state
    >>> optimizer_name(toy_state().opt_state)
    'ScaleByAdamState'
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Mapping
from typing import Any

import safetensors
import torch
from torch import nn

import funczero
from funczero.checkpoint.entry import Chunk, TensorEntry
from funczero.checkpoint.errors import SaveError
from funczero.checkpoint.format import FORMAT_NAME, FORMAT_VERSION, GROUPS, shard_file_name
from funczero.train.state import TrainState

__all__ = ["build_index", "optimizer_name", "tied_aliases"]


def tied_aliases(
    state: TrainState, aliases: Mapping[str, str] | None, module: nn.Module | None
) -> dict[str, str]:
    """Tied parameters, alias FQN -> canonical FQN: the state's, the module's, then ``aliases``."""
    tied: dict[str, str] = dict(getattr(state.layout, "aliases", None) or {})
    if module is not None:
        first: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            tied[name] = first.setdefault(id(p), name)
    tied.update(aliases or {})
    names = dict(state.layout.shapes)
    for alias, canonical in tied.items():
        if alias != canonical and alias in names:
            raise ValueError(
                f"aliases: {alias!r} -> {canonical!r}, but {alias!r} is a parameter of the state "
                "itself; map only the other names of a tied parameter to its canonical FQN"
            )
        if canonical not in names:
            raise ValueError(
                f"aliases: {alias!r} -> {canonical!r}, but {canonical!r} is not a parameter of "
                "the state; map each tied alias FQN to its canonical parameter FQN"
            )
    return {a: c for a, c in sorted(tied.items()) if a != c}


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


def non_persistent_buffers(module: nn.Module | None) -> list[str]:
    """Buffers of ``module`` that ``state_dict()`` leaves out (consolidate leaves them out too)."""
    if module is None:
        return []
    kept = set(module.state_dict(keep_vars=True))
    return sorted(n for n, _ in module.named_buffers(remove_duplicate=False) if n not in kept)


def _chunks(
    entry: TensorEntry,
    results: list[dict[str, Any]],
    digests: dict[tuple[str, int], dict[str, str]],
    world: int,
) -> tuple[Chunk, ...]:
    """Where every rank stored ``entry``, from the ranks' reports (rank 0 builds the index)."""
    per_rank = entry.placement == "per_rank"
    chunks = []
    for rank, start, stop in entry.stored_ranges(world):
        name = shard_file_name(entry.group, rank, world)
        if per_rank:
            shapes = results[rank]["files"][GROUPS.index(entry.group)]["per_rank_shapes"]
            if tuple(shapes.get(entry.path, ())) != entry.shape:
                raise SaveError(
                    f"{entry.path}: rank {rank} holds shape {shapes.get(entry.path)}, rank 0 "
                    f"{list(entry.shape)}; per-rank tensors must have the same shape on every rank"
                )
        sha = digests[(name, rank)].get(entry.path)
        if sha is None:
            raise SaveError(
                f"rank {rank} did not write {entry.path}: ranks disagree on the state's structure"
            )
        chunks.append(Chunk(name, entry.path, start, stop, sha, rank if per_rank else None))
    return tuple(chunks)


def build_index(
    state: TrainState,
    entries: list[tuple[TensorEntry, torch.Tensor]],
    alias_of: dict[str, str],
    tied: dict[str, str],
    results: list[dict[str, Any]],
    tag: str,
    ckpt_id: str,
    config: Any,
    module: nn.Module | None,
) -> dict[str, Any]:
    lay = state.layout
    world = lay.world_size
    digests: dict[tuple[str, int], dict[str, str]] = {}
    files: dict[str, Any] = {}
    for rank, res in enumerate(results):
        for f in res["files"]:
            digests[(f["name"], rank)] = f["digests"]
            files[f["name"]] = {
                "group": f["name"].split("-")[0],
                "rank": rank,
                "bytes": f["bytes"],
                "sha256": f["sha256"],
            }
    tensors: dict[str, Any] = {}
    for entry, _ in entries:
        if entry.path in alias_of:
            stored = dataclasses.replace(entry, alias_of=alias_of[entry.path])
        else:
            stored = dataclasses.replace(entry, chunks=_chunks(entry, results, digests, world))
        tensors[entry.path] = stored.to_json()
    clients = [r["client_state"] for r in results]
    now = time.time_ns()
    index: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "funczero_version": funczero.__version__,
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "checkpoint_id": ckpt_id,
        "tag": tag,
        "step": int(state.step),
        "created": datetime.datetime.fromtimestamp(now / 1e9, datetime.timezone.utc).isoformat(),
        "created_ns": now,
        "world_size": world,
        "stage": lay.stage,
        "precision": lay.precision,
        "optimizer": optimizer_name(state.opt_state),
        "params": {
            "shapes": {n: list(s) for n, s in lay.shapes},
            "trainable": list(lay.trainable),
            "sharded": sorted(lay.sharded_params),
            "aliases": tied,
            "non_persistent_buffers": non_persistent_buffers(module),
        },
        "config": config,
        "client_state": clients[0],
        "files": dict(sorted(files.items())),
        "tensors": tensors,
    }
    if any(c != clients[0] for c in clients):
        index["client_state_per_rank"] = clients
    return index
