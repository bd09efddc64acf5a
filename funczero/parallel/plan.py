"""The ZeRO plan: a frozen description of how a module is sharded and communicated.

:func:`build_plan` reads the module once (names, shapes, ties, frozen flags), groups parameters
into units (one per transformer block by default, plus the root) and records every parameter's
:class:`~funczero.parallel.sharding.ShardSpec`. The stage functions in
:mod:`funczero.parallel.zero` only read the plan.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    >>> [u.name for u in build_plan(model, stage=3).units]
    ['0.0']
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from funczero.module import ModuleSpec, module_spec
from funczero.parallel.sharding import ShardSpec, Unit
from funczero.parallel.precision import Precision

__all__ = ["ZeroPlan", "build_plan", "default_wrap_policy"]

@dataclasses.dataclass(frozen=True, eq=False)
class ZeroPlan:
    """Static description of how a module is sharded and communicated.

    Attributes:
        module: the model (its own tensors are released; it only describes the computation).
        spec: parameter and buffer names, shapes, ties and frozen flags.
        stage: ZeRO stage 0-3.
        precision: compute / master / reduce dtypes.
        rank, world_size, group: data-parallel position and process group (None when world 1).
        units: communication units. Stages 1-2: every parameter in its owning unit. Stage 3: the
            sharded parameters, one unit per wrapped module plus the root unit ``""``.
        persistent: stage 3 only: parameters kept replicated (below
            ``stage3_param_persistence_threshold`` elements), reduced like stage 2.
        specs: shard layout of every parameter.
        slots: stage 3: for each wrapped module, the ``(submodule, attribute, canonical)`` uses
            of its sharded parameters.
        use_all_reduce: reduce gradients with all-reduce plus slice (``reduce_scatter: false``).
        bucket_numel: stage 0 all-reduce bucket size in elements (``reduce_bucket_size``).
        remat: stage 3: recompute each unit's forward in backward instead of saving its
            activations (activation checkpointing per unit).
        buffer_sync: how buffers (BatchNorm statistics) agree across ranks after a step:
            ``"mean"`` (all-reduce average of floating buffers) or ``"none"``.
    """

    module: nn.Module
    spec: ModuleSpec
    stage: int
    precision: Precision
    rank: int
    world_size: int
    group: Any
    units: tuple[Unit, ...]
    persistent: Unit | None
    specs: Mapping[str, ShardSpec]
    slots: Mapping[str, tuple[tuple[nn.Module, str, str], ...]]
    use_all_reduce: bool = False
    bucket_numel: int = 500_000_000
    remat: bool = False
    buffer_sync: str = "mean"

    @property
    def trainable(self) -> tuple[str, ...]:
        return self.spec.trainable

    def is_sharded(self, name: str) -> bool:
        """Whether ``state.params[name]`` holds a shard (stage 3, not persistent)."""
        return self.stage == 3 and not (self.persistent and name in self.persistent.params)

    @property
    def master_sharded(self) -> bool:
        """Whether master weights, gradients and optimizer state are shards (stages 1-3)."""
        return self.stage >= 1

    def grad_unit(self, unit: Unit) -> Unit:
        """``unit`` restricted to trainable parameters (what gradients are reduced over)."""
        # Cached: the step asks for every unit's each time, and the host must stay ahead of
        # the GPU.
        cache = self._cache.setdefault("grad_unit", {})
        key = (unit.name, unit.params)
        if key not in cache:
            t = set(self.trainable)
            keep = [(n, s) for n, s in zip(unit.params, unit.specs) if n in t]
            cache[key] = Unit(unit.name, tuple(n for n, _ in keep), tuple(s for _, s in keep))
        return cache[key]

    @property
    def _cache(self) -> dict[str, Any]:
        """Derived, per-plan values (the plan itself is frozen)."""
        return _PLAN_CACHE.setdefault(self, {})

    def reduce_fn(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial reductions over shards (identity when nothing is sharded)."""
        if not self.master_sharded or self.world_size == 1:
            return x
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y


_PLAN_CACHE: weakref.WeakKeyDictionary[ZeroPlan, dict[str, Any]] = weakref.WeakKeyDictionary()


def default_wrap_policy(module: nn.Module) -> list[str]:
    """One unit per child of every ``nn.ModuleList`` (per transformer block), outermost only."""
    units: list[str] = []
    for name, mod in module.named_modules():
        if isinstance(mod, nn.ModuleList) and not any(
            name == u or name.startswith(u + ".") for u in units
        ):
            units.extend(f"{name}.{child}" if name else child for child, _ in mod.named_children())
    return units


def _owner(fqn: str, unit_names: Sequence[str]) -> str:
    best = ""
    for u in unit_names:
        if fqn.startswith(u + ".") and len(u) > len(best):
            best = u
    return best


def build_plan(
    module: nn.Module,
    *,
    stage: int = 0,
    precision: Precision | str = "fp32",
    world_size: int | None = None,
    rank: int | None = None,
    group: Any = None,
    wrap: Sequence[str] | Callable[[nn.Module], list[str]] | None = None,
    param_persistence_threshold: int = 0,
    reduce_scatter: bool = True,
    reduce_bucket_size: int = 500_000_000,
    remat: bool = False,
    buffer_sync: str = "mean",
) -> ZeroPlan:
    """Plan ZeRO ``stage`` for ``module`` on the current process group.

    Args:
        module: the model, built on any device (its parameters give shapes and initial values).
        stage: 0, 1, 2 or 3.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or a :class:`Precision`.
        world_size, rank, group: default to the initialised default group, else 1 / 0 / None.
        wrap: module FQNs that form units, or a policy returning them; default
            :func:`default_wrap_policy` (every transformer block).
        param_persistence_threshold: stage 3 keeps parameters with fewer elements replicated.
        reduce_scatter: False reduces with all-reduce plus slice.
        reduce_bucket_size: stage 0 all-reduce bucket size (elements).
        remat: stage 3: recompute unit forwards in backward (activation checkpointing).
        buffer_sync: ``"mean"`` or ``"none"``.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    if buffer_sync not in ("mean", "none"):
        raise ValueError(f"buffer_sync={buffer_sync!r} must be 'mean' or 'none'")
    precision = Precision.from_name(precision) if isinstance(precision, str) else precision
    if world_size is None:
        world_size = dist.get_world_size(group) if dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank(group) if dist.is_initialized() else 0
    if world_size > 1 and not dist.is_initialized():
        raise RuntimeError(
            f"world_size={world_size} but torch.distributed is not initialised; "
            "call funczero.init_distributed() first"
        )
    spec = module_spec(module)
    specs = {n: ShardSpec(n, spec.shapes[n], world_size) for n in spec.params}
    unit_names = list(wrap(module) if callable(wrap) else (wrap or default_wrap_policy(module)))
    known = dict(module.named_modules())
    for u in unit_names:
        if u not in known:
            raise ValueError(f"wrap: {u!r} is not a submodule of the model; known: {sorted(known)[:8]}...")
    order = [""] + unit_names
    owners = {alias: _owner(alias, unit_names) for alias in spec.aliases}

    persistent: Unit | None = None
    slots: dict[str, tuple[tuple[nn.Module, str, str], ...]] = {}
    if stage == 3:
        kept = [n for n in spec.params if specs[n].numel < param_persistence_threshold]
        if kept:
            persistent = Unit("<persistent>", tuple(kept), tuple(specs[n] for n in kept))
        sharded = [n for n in spec.params if n not in set(kept)]
        members: dict[str, list[str]] = {u: [] for u in order}
        for n in sharded:
            for u in dict.fromkeys(owners[a] for a in spec.alias_names(n)):
                members[u].append(n)
        for u in unit_names:
            uses = []
            for alias, canonical in spec.aliases.items():
                if owners[alias] == u and canonical in members[u]:
                    rel = alias[len(u) + 1 :]
                    sub, _, attr = rel.rpartition(".")
                    uses.append((known[u].get_submodule(sub), attr, canonical))
            slots[u] = tuple(uses)
    else:
        members = {u: [] for u in order}
        for n in spec.params:
            members[owners[n]].append(n)
    units = tuple(
        Unit(u, tuple(members[u]), tuple(specs[n] for n in members[u])) for u in order if members[u]
    )
    return ZeroPlan(
        module=module,
        spec=spec,
        stage=stage,
        precision=precision,
        rank=rank,
        world_size=world_size,
        group=group,
        units=units,
        persistent=persistent,
        specs=specs,
        slots=slots,
        use_all_reduce=not reduce_scatter,
        bucket_numel=int(reduce_bucket_size),
        remat=remat,
        buffer_sync=buffer_sync,
    )
