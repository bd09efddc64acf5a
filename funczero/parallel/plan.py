"""The ZeRO plan: a frozen description of how a module is sharded and communicated.

:func:`build_plan` reads the module once (names, shapes, ties, frozen flags), groups parameters
into units (one per transformer block by default, plus the root) and records every parameter's
:class:`~funczero.parallel.sharding.ShardSpec`, and derives once everything the step needs from
the module: its stage's policy (:data:`~funczero.parallel.stages.STAGES`), the units'
trainable parts and their :class:`~funczero.parallel.units.StepUnit` boundaries. A plan is
frozen data: nothing writes to it after :func:`build_plan`.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    >>> [u.name for u in build_plan(model, stage=3).units]
    ['0.0']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from funczero.module import ModuleSpec, Slots, module_spec, tensor_slots
from funczero.parallel.collectives import all_reduce_sum
from funczero.parallel.hybrid import HybridLayout, check_shard_size, hybrid_layout
from funczero.parallel.precision import Precision
from funczero.parallel.sharding import ShardSpec, Unit
from funczero.parallel.stages import STAGES, Stage
from funczero.parallel.units import StepUnit

__all__ = ["Remat", "ZeroPlan", "build_plan", "default_wrap_policy"]

Remat = bool | int | Sequence[str] | Callable[[str], bool]
"""Which units recompute their forward in backward: all, every k-th, by name, or a predicate."""

@dataclasses.dataclass(frozen=True, eq=False)
class ZeroPlan:
    """Static description of how a module is sharded and communicated.

    Attributes:
        module: the model (its own tensors are released; it only describes the computation).
        spec: parameter and buffer names, shapes, ties and frozen flags.
        policy: the ZeRO stage's row (:class:`~funczero.parallel.stages.Stage`).
        precision: compute / master / reduce dtypes.
        rank, world_size, group: position in, and size and process group of, the ranks that
            shards are cut over (None when 1): all data-parallel ranks, or with hybrid
            sharding this rank's shard group.
        units: communication units. Stages 0-2: every parameter in its owning unit. Stage 3: the
            sharded parameters, one unit per wrapped module plus the root unit ``""``.
        persistent: stage 3 only: parameters kept replicated (below
            ``stage3_param_persistence_threshold`` elements), reduced like stage 2.
        shard_specs: shard layout of every parameter (``spec`` is the module's structure).
        slots: stage 3: for each wrapped module, the ``(submodule, attribute, canonical)`` uses
            of its sharded parameters.
        grad_units: ``units`` restricted to trainable parameters, empty ones dropped (what
            gradients are reduced over and master weights gathered from).
        persistent_grad_unit: ``persistent`` restricted likewise, or None.
        root_parts: boundaries of the root unit, one per top-level submodule (see
            :func:`_root_parts`); they stay gathered through backward.
        blocks: boundaries of the wrapped units (transformer blocks), in module order.
        persistent_units: the boundary of the persistent unit (stage 3), or none.
        use_all_reduce: reduce gradients with all-reduce plus slice (``reduce_scatter: false``).
        bucket_numel: stage 0 all-reduce bucket size in elements (``reduce_bucket_size``).
        wrapped: the wrapped unit modules' FQNs (transformer blocks), in model order.
        remat_units: wrapped units whose forward is recomputed in backward instead of keeping
            its activations (activation checkpointing per unit, any stage).
        param_slots, buffer_slots: where every parameter alias and buffer sits in the module
            (for binding the step's tensors to it).
        buffer_sync: how buffers (BatchNorm statistics) agree across ranks after a step:
            ``"mean"`` (all-reduce average of floating buffers) or ``"none"``.
        hybrid: hybrid sharding (:mod:`funczero.parallel.hybrid`): the ``replicate x shard``
            mesh; None for flat ZeRO (shards over all data-parallel ranks).
    """

    module: nn.Module
    spec: ModuleSpec
    policy: Stage
    precision: Precision
    rank: int
    world_size: int
    group: Any
    units: tuple[Unit, ...]
    persistent: Unit | None
    shard_specs: Mapping[str, ShardSpec]
    slots: Mapping[str, Slots]
    grad_units: tuple[Unit, ...]
    persistent_grad_unit: Unit | None
    root_parts: tuple[StepUnit, ...]
    blocks: tuple[StepUnit, ...]
    persistent_units: tuple[StepUnit, ...]
    wrapped: tuple[str, ...] = ()
    remat_units: frozenset[str] = frozenset()
    param_slots: Slots = ()
    buffer_slots: Slots = ()
    use_all_reduce: bool = False
    bucket_numel: int = 500_000_000
    buffer_sync: str = "mean"
    hybrid: HybridLayout | None = None

    @property
    def stage(self) -> int:
        """The ZeRO stage number (0-3)."""
        return self.policy.number

    @property
    def trainable(self) -> tuple[str, ...]:
        return self.spec.trainable

    def is_sharded(self, name: str) -> bool:
        """Whether ``state.params[name]`` holds a shard (stage 3, not persistent)."""
        return self.policy.params_at_rest == "shard" and not (
            self.persistent is not None and name in self.persistent.params
        )

    @property
    def master_sharded(self) -> bool:
        """Whether master weights, gradients and optimizer state are shards (stages 1-3)."""
        return self.policy.master_sharded

    @property
    def data_parallel_size(self) -> int:
        """All data-parallel ranks (each trains on its own data): ``world_size`` times the replicas."""
        return self.hybrid.world_size if self.hybrid is not None else self.world_size

    @property
    def data_parallel_rank(self) -> int:
        """This rank among all data-parallel ranks."""
        return self.hybrid.rank if self.hybrid is not None else self.rank

    @property
    def data_parallel_group(self) -> Any:
        """The group of all data-parallel ranks (scalars and buffers are reduced over it)."""
        return self.hybrid.world_group if self.hybrid is not None else self.group

    @property
    def grad_copies(self) -> int:
        """How many data-parallel ranks hold each element of the reduced gradients."""
        if not self.master_sharded:
            return self.data_parallel_size
        return self.hybrid.replicate_size if self.hybrid is not None else 1

    def reduce_fn(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial reductions over shards (identity when nothing is sharded).

        Every shard group holds all shards, so the sum over it is the whole (hybrid too).
        """
        if not self.master_sharded:
            return x
        return all_reduce_sum(x, group=self.group, world_size=self.world_size)


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
    remat: Remat = False,
    buffer_sync: str = "mean",
    mesh: Any = None,
    shard_group_size: int | None = None,
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
        remat: activation checkpointing per unit, at any stage: ``True`` (every unit), an int
            ``k`` (every k-th unit: the 1st, the (k+1)-th, ...), unit names, or a predicate on a
            unit's name. A recomputed unit keeps only its inputs for backward and runs its
            forward again there; gradients are bit-identical.
        buffer_sync: ``"mean"`` or ``"none"``.
        mesh: hybrid sharding (stages 1-3) on a 2-D ``DeviceMesh`` named ``("replicate",
            "shard")`` over all ranks: shards are cut over the ``shard`` dimension and
            replicated over ``replicate`` (FSDP2's HSDP; :mod:`funczero.parallel.hybrid`).
        shard_group_size: hybrid sharding with shard groups of this many consecutive ranks
            (DeepSpeed's ``mics_shard_size``); the world size is a multiple of it. Equal to the
            world size, or with ``mesh`` / ``shard_group_size`` None: flat ZeRO.
    """
    if stage not in STAGES:
        raise ValueError(f"zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    policy = STAGES[stage]
    if buffer_sync not in ("mean", "none"):
        raise ValueError(f"buffer_sync={buffer_sync!r} must be 'mean' or 'none'")
    precision = Precision.from_name(precision) if isinstance(precision, str) else precision
    hybrid = _hybrid(stage, mesh, shard_group_size, (world_size, rank, group))
    if hybrid is not None:
        world_size, rank, group = hybrid.shard_size, hybrid.shard_rank, hybrid.shard_group
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
    _check_wrap(unit_names, known)
    order = [""] + unit_names
    owners = {alias: _owner(alias, unit_names) for alias in spec.aliases}

    persistent: Unit | None = None
    slots: dict[str, Slots] = {}
    if policy.params_at_rest == "shard":
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
    trainable = spec.trainable
    param_slots, buffer_slots = tensor_slots(module, spec)
    grad_units = tuple(gu for gu in (u.restrict(trainable) for u in units) if gu.params)
    persistent_grad_unit = persistent.restrict(trainable) if persistent is not None else None
    boundaries = _boundaries(
        units, persistent, trainable,
        replicated=policy.params_at_rest == "replicated",
        reduction=policy.grad_reduction,
        compute_dtype=precision.compute_dtype,
        reduce_dtype=precision.reduce_dtype,
        use_all_reduce=not reduce_scatter,
        group=group,
        rank=rank,
        hybrid=hybrid,
    )  # fmt: skip
    return ZeroPlan(
        module=module,
        spec=spec,
        policy=policy,
        precision=precision,
        rank=rank,
        world_size=world_size,
        group=group,
        units=units,
        persistent=persistent,
        shard_specs=specs,
        slots=slots,
        grad_units=grad_units,
        persistent_grad_unit=persistent_grad_unit if persistent_grad_unit and persistent_grad_unit.params else None,
        root_parts=boundaries[0],
        blocks=boundaries[1],
        persistent_units=boundaries[2],
        wrapped=tuple(unit_names),
        remat_units=_remat_units(remat, unit_names),
        param_slots=param_slots,
        buffer_slots=buffer_slots,
        use_all_reduce=not reduce_scatter,
        bucket_numel=int(reduce_bucket_size),
        buffer_sync=buffer_sync,
        hybrid=hybrid,
    )


def _hybrid(
    stage: int, mesh: Any, shard_group_size: int | None, flat: tuple[Any, Any, Any]
) -> HybridLayout | None:
    """The hybrid layout ``mesh`` / ``shard_group_size`` ask for; None for flat ZeRO."""
    if mesh is None and shard_group_size is None:
        return None
    if mesh is not None and shard_group_size is not None:
        raise ValueError(
            f"build_plan: pass mesh= or shard_group_size={shard_group_size}, not both "
            "(the mesh already says the shard group size)"
        )
    if any(x is not None for x in flat):
        raise ValueError(
            "build_plan: world_size/rank/group describe flat ZeRO; with mesh= or "
            "shard_group_size= they come from the mesh (pass neither)"
        )
    if stage == 0:
        what = f"shard_group_size={shard_group_size}" if mesh is None else "mesh="
        raise ValueError(
            f"build_plan: {what} asks for hybrid sharding, but stage 0 shards nothing (it "
            "all-reduces gradients over every rank); use stage 1, 2 or 3, or drop it"
        )
    if mesh is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if check_shard_size(shard_group_size, world_size=world) == world:
            return None  # one shard group over every rank: flat ZeRO
    layout = hybrid_layout(mesh=mesh, shard_group_size=shard_group_size)
    if layout.replicate_size == 1:
        return None
    if layout.shard_size == 1:
        raise ValueError(
            f"build_plan: shard groups of 1 rank ({layout.replicate_size} replicas) shard "
            "nothing: that is plain data parallelism (stage 0); use stage 0, or shard groups "
            "of 2 or more ranks (e.g. the GPUs of a node)"
        )
    return layout


def _check_wrap(unit_names: Sequence[str], known: Mapping[str, nn.Module]) -> None:
    """Each wrapped module exists, is named once, and is not the root (always a unit)."""
    seen: set[str] = set()
    for u in unit_names:
        if u == "":
            raise ValueError(
                "wrap: '' is the root module, which is always a unit of its own; "
                "list only submodules (e.g. transformer blocks)"
            )
        if u not in known:
            raise ValueError(f"wrap: {u!r} is not a submodule of the model; known: {sorted(known)[:8]}...")
        if u in seen:
            raise ValueError(f"wrap: {u!r} is named more than once; name each unit module once")
        seen.add(u)


def _remat_units(remat: Remat, units: Sequence[str]) -> frozenset[str]:
    """The unit names ``remat`` selects (see :func:`build_plan`)."""
    if isinstance(remat, bool):
        return frozenset(units) if remat else frozenset()
    if isinstance(remat, int):
        if remat < 1:
            raise ValueError(f"remat={remat} must be True/False, a unit interval >= 1, names or a predicate")
        return frozenset(u for i, u in enumerate(units) if i % remat == 0)
    if callable(remat):
        return frozenset(u for u in units if remat(u))
    names = frozenset(remat)
    unknown = sorted(names - set(units))
    if unknown:
        raise ValueError(
            f"remat: {unknown} are not units of the model; units are the wrapped modules "
            f"{list(units)[:8]}... (change `wrap` to make other modules units)"
        )
    return names


def _boundaries(
    units: tuple[Unit, ...],
    persistent: Unit | None,
    trainable: tuple[str, ...],
    *,
    replicated: bool,
    **facts: Any,
) -> tuple[tuple[StepUnit, ...], tuple[StepUnit, ...], tuple[StepUnit, ...]]:
    """The step's unit boundaries: ``(root parts, blocks, persistent)``.

    An anchor in two units (a weight tied across stage-3 units) gets its gradient summed by
    autograd on the compute stream, so those units wait for their reduction (``wait_now``).
    """
    root = next((u for u in units if u.name == ""), None)
    roots = _root_parts(root) if root is not None else ()
    blocks = tuple(u for u in units if u.name != "")
    kept = (persistent,) if persistent is not None else ()
    seen: set[str] = set()
    shared: set[str] = set()
    for unit in (*roots, *blocks, *kept):
        names = set(unit.restrict(trainable).params)
        shared |= seen & names
        seen |= names

    def step_unit(unit: Unit, *, keep: bool = False, full: bool = replicated) -> StepUnit:
        wait_now = bool(shared & set(unit.restrict(trainable).params))
        return StepUnit.of(
            unit, trainable, replicated=full, keep_gathered=keep, wait_now=wait_now, **facts
        )

    return (
        tuple(step_unit(u, keep=True) for u in roots),
        tuple(step_unit(u) for u in blocks),
        tuple(step_unit(u, full=True) for u in kept),
    )


def _root_parts(root: Unit) -> tuple[Unit, ...]:
    """The root unit split by top-level submodule (``wte``, ``wpe``, ``head``, ...).

    Each part gets its own boundary, so its gradients are reduced as soon as they are complete:
    an output head's while the blocks' backward runs, not with the embedding's at the very end,
    where nothing is left to overlap. At stage 3 each part also has its own gathered buffer, so
    backward keeps only the parts it reads (the head), not the embedding. With more than 8 such
    submodules the root stays whole (one collective each way).
    """
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(root.params):
        groups.setdefault(name.split(".")[0] if "." in name else "", []).append(i)
    if len(groups) > 8:
        return (root,)
    return tuple(
        Unit("", tuple(root.params[i] for i in idx), tuple(root.specs[i] for i in idx))
        for idx in groups.values()
    )
