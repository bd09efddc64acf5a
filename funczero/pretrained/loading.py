"""``load_pretrained``: pretrained weights straight into this rank's part of a sharded state.

Every rank reads only the flat element ranges its state holds, as the state's recorded layout
says (``state.layout.leaf("master/<name>")``): a ``shard`` leaf the range
``ShardSpec(name, shape, world_size).bounds(rank)``, a ``replicated`` leaf the whole tensor. The
ranges of one parameter's leaves (fp32 master shard, compute-dtype parameters) are read once,
block by block, and each block is cast into every leaf that holds it: no full-size temporary,
whatever the stage. Optimizer moments, the step, the loss scale and the RNG stay as they were.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> from funczero import optim
    >>> from funczero.parallel.plan import build_plan
    >>> from funczero.train.state import init_state
    >>> d = Path(tempfile.mkdtemp())
    >>> save_file({"model.weight": torch.full((1, 3), 2.0), "model.bias": torch.ones(1)},
    ...           d / "model.safetensors")
    >>> model = torch.nn.Linear(3, 1)
    >>> plan = build_plan(model, stage=3)
    >>> state = init_state(plan, optim.sgd(0.1), dict(model.named_parameters()), {})
    >>> loaded = load_pretrained(state, d, plan=plan)   # "model." is detected and stripped
    >>> loaded.master["weight"], loaded.params["weight"] is loaded.master["weight"]
    (tensor([2., 2., 2.]), True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from funczero import tree
from funczero.parallel.sharding import ShardSpec
from funczero.pretrained.collective import agree, check_world, state_device
from funczero.pretrained.errors import WeightsMismatchError
from funczero.pretrained.names import NameMap, WeightMatch, match_names
from funczero.pretrained.sources import BLOCK_ELEMS, WeightSource, open_weights
from funczero.train.state import TrainState

if TYPE_CHECKING:
    from funczero.parallel.plan import ZeroPlan

__all__ = ["load_pretrained"]


def load_pretrained(
    state: TrainState,
    path: str | os.PathLike[str],
    *,
    plan: ZeroPlan | None = None,
    strict: bool = True,
    name_map: NameMap | None = None,
    prefix: str | None = None,
    donate: bool = False,
) -> TrainState:
    """Load pretrained weights into ``state``; return the new state.

    Collective when the state spans several ranks: every rank of the plan's group calls it
    (each reads only its own ranges; one small all-reduce at the end makes all ranks raise
    together if any failed).

    Args:
        state: a state built by :func:`funczero.initialize` or :func:`funczero.init_state`.
        path: a Hugging Face model directory (``model.safetensors`` or
            ``model.safetensors.index.json``), one of those files, funczero's consolidated
            output, or a funczero training checkpoint (root or tag directory: weights only).
        plan: the state's plan. Gives the process group (default: the default group), the
            module's persistent buffers (reported missing when absent) and a Hugging Face
            model's ``_keys_to_ignore_on_load_unexpected`` / ``_missing`` patterns.
        strict: raise on missing or unexpected keys (all listed in one
            :class:`~funczero.pretrained.WeightsMismatchError`). ``False`` keeps the initial
            values of missing parameters and ignores unexpected keys. Wrong shapes always raise.
        name_map: renames checkpoint keys to model names (dict or callable; ``None`` skips a
            key); see :mod:`funczero.pretrained.names`.
        prefix: strip this prefix from checkpoint keys (``"model."``); default: detected;
            ``""``: names must match exactly.
        donate: write into ``state``'s own tensors and mark it donated, as a donating
            ``train_step`` does (peak memory: the state plus two staging blocks of
            :data:`~funczero.pretrained.sources.BLOCK_ELEMS` elements, 128 MiB for an fp32
            checkpoint). Default: the returned state has new tensors and ``state`` is left
            untouched.

    Returns:
        The state with the checkpoint's parameters (fp32 master weights exact, compute-dtype
        parameters rounded from them as :func:`~funczero.init_state` does) and buffers.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsFormatError: ``path`` is not a weights checkpoint, or its files are damaged.
        WeightsMismatchError: the checkpoint's names or shapes do not fit the model.
    """
    layout = state.layout
    leaves = layout.leaf_map()
    group = plan.group if plan is not None else None
    check_world(layout, group)
    buffers = {n: tuple(b.shape) for n, b in state.buffers.items()}
    rules = _module_rules(plan, buffers)
    device = state_device(state)
    loader: _Loader | None = None
    failure: BaseException | None = None
    new_state = state
    try:
        with open_weights(path) as source:
            match = match_names(
                source.tensors,
                shapes=dict(layout.shapes),
                aliases=dict(layout.aliases),
                buffers=buffers,
                required_buffers=rules[0],
                source_ties=source.tied,
                name_map=name_map,
                prefix=prefix,
                ignore_unexpected=rules[1],
                ignore_missing=rules[2],
            )
            _raise_problems(match, strict, source)
            loader = _Loader(state, source, leaves, donate=donate)
            new_state = loader.run(match)
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has agreed
        failure = e
    if failure is not None and donate and loader is not None and loader.started:
        state.mark_donated()  # half-written: never usable again
    agree(failure, layout, group, device, what="loading pretrained weights")
    if donate:
        state.mark_donated()
    return new_state


def _module_rules(
    plan: ZeroPlan | None, buffers: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """``(persistent buffers, unexpected patterns, missing patterns)`` read from the module."""
    if plan is None:
        return [], [], []
    module = plan.module
    persistent = [k for k in module.state_dict(keep_vars=True) if k in buffers]
    unexpected = list(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or [])
    missing = list(getattr(module, "_keys_to_ignore_on_load_missing", None) or [])
    return persistent, unexpected, missing


def _raise_problems(match: WeightMatch, strict: bool, source: WeightSource) -> None:
    missing = match.missing if strict else []
    unexpected = match.unexpected if strict else []
    if missing or unexpected or match.mismatched:
        where = f"{source.path} ({source.kind}; prefix change: {match.rename})"
        raise WeightsMismatchError(
            missing=missing, unexpected=unexpected, mismatched=match.mismatched, source=where
        )


class _Loader:
    """Reads matched tensors into new (or, donating, the old) tensors of one state."""

    def __init__(
        self,
        state: TrainState,
        source: WeightSource,
        leaves: Mapping[str, Any],
        *,
        donate: bool,
    ) -> None:
        self.state = state
        self.source = source
        self.leaves = leaves
        self.layout = state.layout
        self.donate = donate
        self.started = False
        self._new: dict[int, torch.Tensor] = {}  # id(old tensor) -> its replacement
        self._buffers: dict[tuple[torch.dtype, bool], torch.Tensor] = {}

    def _target(self, old: torch.Tensor) -> torch.Tensor:
        """The tensor replacing ``old`` (one per old tensor: shared leaves stay shared)."""
        if id(old) not in self._new:
            self._new[id(old)] = old if self.donate else torch.empty_like(old)
        return self._new[id(old)]

    def _leaf_range(self, path: str, name: str) -> tuple[int, int]:
        lay = self.leaves[path]
        numel = lay.numel
        if lay.placement == "shard":
            spec = ShardSpec(name, torch.Size(lay.shape), self.layout.world_size)
            return spec.bounds(self.layout.rank)
        if lay.placement == "replicated":
            return 0, numel
        raise ValueError(
            f"state leaf {path} is laid out per rank; pretrained weights load only into "
            "sharded or replicated parameters"
        )

    def run(self, match: WeightMatch) -> TrainState:
        state = self.state
        params, master = state.params, state.master
        self.started = True
        written: set[int] = set()
        for name, key in match.params.items():
            dests: list[tuple[torch.Tensor, int, int]] = []
            for path, old in ((f"master/{name}", master.get(name)), (f"params/{name}", params.get(name))):
                if old is None or id(old) in written:
                    continue  # absent, or the same tensor as the master copy: written once
                written.add(id(old))
                a, b = self._leaf_range(path, name)
                dests.append((self._target(old), a, b))
            self._fill(key, dests)
            for copy in match.tied_copies.get(name, []):
                self._check_tied_copy(name, key, copy, dests)
        for name, key in match.buffers.items():
            old = state.buffers[name]
            self._fill(key, [(self._target(old), 0, old.numel())])
        new_params = {n: self._kept(t) for n, t in params.items()}
        new_master = {n: self._kept(t) for n, t in master.items()}
        new_buffers = {n: self._kept(t) for n, t in state.buffers.items()}
        rest: dict[str, Any] = {
            f: getattr(state, f) for f in ("opt_state", "step", "loss_scale", "rng", "skipped")
        }
        if not self.donate:
            # The new state must not share buffers with the old one: a donating step would
            # otherwise change the old state's optimizer moments under it.
            rest = {f: tree.map(_clone, v) for f, v in rest.items()}
        return state.replace(params=new_params, master=new_master, buffers=new_buffers, **rest)

    def _kept(self, old: torch.Tensor) -> torch.Tensor:
        """The loaded replacement of ``old``, or (not in the checkpoint) its initial values."""
        if id(old) in self._new:
            return self._new[id(old)]
        new = old if self.donate else old.clone()
        self._new[id(old)] = new
        return new

    def _fill(self, key: str, dests: Iterable[tuple[torch.Tensor, int, int]]) -> None:
        """Read the union of the destinations' ranges once and cast it into each of them.

        When one CPU destination covers the union and holds the stored values exactly (the same
        dtype, or fp32 for bf16/fp16), the bytes are read straight into it and the others are
        cast from it; otherwise blocks go through a staging buffer into every destination.
        """
        dests = list(dests)
        if not dests:
            return
        a = min(d[1] for d in dests)
        b = max(d[2] for d in dests)
        stored = self.source.tensors[key].dtype
        flats = [(t.view(-1), da, db) for t, da, db in dests]
        exact = [
            i for i, (flat, da, db) in enumerate(flats)
            if (da, db) == (a, b) and flat.device.type == "cpu" and _holds_exactly(flat.dtype, stored)
        ]  # fmt: skip
        exact.sort(key=lambda i: flats[i][0].dtype != stored)
        others = [f for i, f in enumerate(flats) if not exact or i != exact[0]]
        if exact:
            target = flats[exact[0]][0][: b - a]
            self.source.read_into(key, a, b, target)
            blocks: Iterable[tuple[int, torch.Tensor]] = [(a, target)]
        else:
            to_gpu = any(f[0].device.type == "cuda" for f in flats)
            blocks = self.source.iter_range(key, a, b, self._staging(stored, pinned=to_gpu))
        for start, block in blocks:
            stop = start + block.numel()
            for flat, da, db in others:
                lo, hi = max(start, da), min(stop, db)
                if lo < hi:
                    flat[lo - da : hi - da].copy_(block[lo - start : hi - start])
        for flat, da, db in flats:
            flat[db - da :].zero_()  # the padding of a shard (nothing for a full tensor)

    def _staging(self, dtype: torch.dtype, *, pinned: bool) -> torch.Tensor:
        """Two reusable blocks per stored dtype: one being read while the other is cast.

        Page-locked when they feed a GPU (copies from pageable memory go through a hidden
        bounce buffer at a fraction of the speed); copies stay synchronous, so a block is free
        again as soon as ``copy_`` returns.
        """
        if (dtype, pinned) not in self._buffers:
            self._buffers[(dtype, pinned)] = torch.empty(2 * BLOCK_ELEMS, dtype=dtype, pin_memory=pinned)
        return self._buffers[(dtype, pinned)]

    def _check_tied_copy(
        self, name: str, key: str, copy: str, dests: list[tuple[torch.Tensor, int, int]]
    ) -> None:
        """The checkpoint's other copy of a tied weight must hold what was loaded."""
        t, da, db = max(dests, key=lambda d: (d[2] - d[1], d[0].dtype.itemsize))
        flat = t.view(-1)
        for start, block in self.source.iter_range(copy, da, db):
            got = flat[start - da : start - da + block.numel()]
            if not torch.equal(got, block.to(device=got.device, dtype=got.dtype)):
                problem = (
                    f"{name}: the model ties {copy!r} to it, but the checkpoint holds "
                    f"different values under {key!r} and {copy!r} (an untied checkpoint); "
                    "build the model untied (tie_word_embeddings=False) or drop one key "
                    f"with name_map={{{copy!r}: None}}"
                )
                raise WeightsMismatchError(mismatched=[problem], source=str(self.source.path))


def _holds_exactly(dst: torch.dtype, src: torch.dtype) -> bool:
    """Whether every ``src`` value converts to ``dst`` without rounding."""
    return dst == src or (dst == torch.float32 and src in (torch.bfloat16, torch.float16))


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x
