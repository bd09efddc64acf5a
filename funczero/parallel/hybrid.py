"""Hybrid sharding: shard inside a group of ranks, replicate across groups (HSDP, MiCS).

The data-parallel ranks form a 2-D mesh ``replicate x shard`` (rank ``r * S + s`` is shard
rank ``s`` of replica ``r`` with :func:`hybrid_layout`'s mesh). Parameters, gradients and
optimizer state are sharded over the ``S`` ranks of each *shard group* exactly as flat ZeRO
shards them over the whole world; every shard group holds a full copy. A unit's gradients are
reduce-scattered (averaged) in the shard group, then each reduced shard is averaged across the
``R`` replicas (one all-reduce in the *replicate group*), so every gradient shard ends up the
mean over all ``R * S`` ranks, as in flat ZeRO. All-gathers stay inside the shard group: with
shard groups inside a node, only the gradient all-reduce of ``1/S`` of the model crosses nodes.

This is FSDP2's HSDP (a 2-D ``DeviceMesh``, dims ``("replicate", "shard")``) and DeepSpeed's
MiCS (``zero_optimization.mics_shard_size``). A :class:`~funczero.parallel.plan.ZeroPlan` keeps
``group`` / ``rank`` / ``world_size`` for the shard group (what shards are cut for) and holds a
:class:`HybridLayout` for the rest.

Example:
    >>> layout = HybridLayout(shard_size=4, replicate_size=2, shard_rank=1, replicate_rank=1)
    >>> layout.world_size, layout.rank
    (8, 5)
    >>> check_shard_size(3, world_size=8)
    Traceback (most recent call last):
    ...
    ValueError: shard group size 3 does not divide the world size 8; pick a divisor of 8 (e.g. the GPUs per node: 1, 2, 4, 8)
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from funczero.parallel.collectives import Pending
from funczero.parallel.divergence import check_same_collective, spmd_check_enabled
from funczero.parallel.sharding import Unit

# torch 2.13 renamed the flat-tensor collective; keep working on torch >= 2.5.
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = [
    "MESH_DIMS",
    "HybridLayout",
    "ReplicaPipeline",
    "check_shard_size",
    "hybrid_layout",
    "reduce_scatter_unit_hybrid_async",
    "replica_pipeline",
]

MESH_DIMS = ("replicate", "shard")
"""The dimension names of a hybrid mesh (FSDP2's HSDP order: replicate outer, shard inner)."""

_REPLICA_LABEL = "all-reduce across replicas"


@dataclasses.dataclass(frozen=True)
class HybridLayout:
    """Where this rank sits in a ``replicate x shard`` mesh, and the groups of each dimension.

    Attributes:
        shard_size: ranks per shard group (``S``); shards are cut ``S`` ways.
        replicate_size: number of shard groups (``R``), each holding a full copy.
        shard_rank, replicate_rank: this rank's position in each dimension.
        shard_group, replicate_group: the process groups of this rank's shard group and of the
            ranks holding the same shard in the other replicas.
        world_group: the group of all ``R * S`` ranks (None: the default group); scalars (the
            gradient norm, the loss) and buffers are reduced over it.
    """

    shard_size: int
    replicate_size: int
    shard_rank: int
    replicate_rank: int
    shard_group: Any = None
    replicate_group: Any = None
    world_group: Any = None

    @property
    def world_size(self) -> int:
        """All data-parallel ranks: ``R * S``."""
        return self.shard_size * self.replicate_size

    @property
    def rank(self) -> int:
        """This rank's position among all data-parallel ranks (replica-major)."""
        return self.replicate_rank * self.shard_size + self.shard_rank


def check_shard_size(shard_size: Any, *, world_size: int) -> int:
    """Return ``shard_size`` if it is a valid shard-group size for ``world_size`` ranks.

    Raises:
        ValueError: not a positive int, larger than the world, or not a divisor of it.
    """
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(
            f"shard group size {shard_size!r} must be a positive int (ranks per shard group; "
            f"divisors of the world size {world_size}: {divisors})"
        )
    if shard_size > world_size or world_size % shard_size:
        raise ValueError(
            f"shard group size {shard_size} does not divide the world size {world_size}; pick a "
            f"divisor of {world_size} (e.g. the GPUs per node: {', '.join(map(str, divisors))})"
        )
    return shard_size


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def hybrid_layout(*, mesh: Any = None, shard_group_size: int | None = None) -> HybridLayout:
    """The :class:`HybridLayout` of a 2-D ``DeviceMesh``, or of one built from a shard size.

    Collective when it builds the mesh (``shard_group_size``): every rank calls it.

    Args:
        mesh: a ``torch.distributed.device_mesh.DeviceMesh`` of 2 dimensions over all ranks of
            the default group, named ``("replicate", "shard")`` (unnamed: that order).
        shard_group_size: ranks per shard group; the mesh is ``(world // size, size)`` with
            consecutive ranks in a shard group (inside a node, with the usual rank order).
    """
    if (mesh is None) == (shard_group_size is None):
        raise ValueError("hybrid_layout: pass exactly one of mesh= and shard_group_size=")
    if not dist.is_initialized():
        raise RuntimeError(
            "hybrid sharding needs torch.distributed; call funczero.init_distributed() first"
        )
    world = dist.get_world_size()
    if mesh is None:
        size = check_shard_size(shard_group_size, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(_device_type(), (world // size, size), mesh_dim_names=MESH_DIMS)
    return _layout_of(mesh, world)


def _layout_of(mesh: Any, world: int) -> HybridLayout:
    if mesh.ndim != 2:
        raise ValueError(
            f"hybrid sharding needs a 2-D DeviceMesh (replicate x shard); got {mesh.ndim} "
            f"dimension(s) {tuple(mesh.mesh.shape)}; for flat ZeRO pass no mesh"
        )
    names = mesh.mesh_dim_names or MESH_DIMS
    if set(names) != set(MESH_DIMS):
        raise ValueError(
            f"the DeviceMesh's dimensions are named {tuple(names)}; name them {MESH_DIMS} "
            "(init_device_mesh(..., mesh_dim_names=('replicate', 'shard')))"
        )
    if mesh.size() != world:
        raise ValueError(
            f"the DeviceMesh spans {mesh.size()} ranks but the default group has {world}; "
            "build the mesh over every rank (each rank trains on its own data)"
        )
    rep, shard = (names.index(d) for d in MESH_DIMS)
    ranks = mesh.mesh.permute(rep, shard).reshape(-1).tolist()
    if ranks != list(range(world)):
        raise ValueError(
            f"the DeviceMesh's shard groups are not consecutive ranks (replicate-major order "
            f"{ranks}); funczero's hybrid sharding, and its checkpoints, need rank r * S + s at "
            "(replica r, shard s): build it with init_device_mesh(device, (R, S), "
            "mesh_dim_names=('replicate', 'shard'))"
        )
    return HybridLayout(
        shard_size=mesh.size(shard),
        replicate_size=mesh.size(rep),
        shard_rank=mesh.get_local_rank(shard),
        replicate_rank=mesh.get_local_rank(rep),
        shard_group=mesh.get_group(shard),
        replicate_group=mesh.get_group(rep),
    )


class ReplicaPipeline:
    """The replicas' all-reduces of one backward, each waited one reduction after it was issued.

    A unit's reduction is waited (by :class:`~funczero.parallel.overlap.ReduceQueue`) when the
    next unit's is issued: that wait issues the unit's all-reduce across replicas and waits for
    the previous unit's, so each all-reduce runs while the next unit's backward computes
    (FSDP2's HSDP overlaps it the same way). When the last reduction still unwaited is waited
    (the queue's drain), every all-reduce is waited too.

    Example:
        >>> pipe = ReplicaPipeline()
        >>> pipe.register()
        >>> pipe.issued(Pending(None, lambda: print("all-reduce waited")))
        all-reduce waited
    """

    def __init__(self) -> None:
        self._unwaited = 0
        self._in_flight: list[Pending] = []

    def register(self) -> None:
        """A reduction was issued; it will call :meth:`issued` when waited."""
        self._unwaited += 1

    def issued(self, replicas: Pending) -> None:
        """A registered reduction was waited and issued its all-reduce ``replicas``."""
        self._unwaited -= 1
        older, self._in_flight = self._in_flight, [replicas]
        for pending in older:
            pending.wait()
        if self._unwaited <= 0:
            self.drain()

    def drain(self) -> None:
        """Wait for every all-reduce in flight."""
        while self._in_flight:
            self._in_flight.pop(0).wait()


_pipelines: weakref.WeakKeyDictionary[Any, ReplicaPipeline] = weakref.WeakKeyDictionary()


def replica_pipeline(queue: Any) -> ReplicaPipeline:
    """The :class:`ReplicaPipeline` of one step's reduction ``queue`` (created on first use;
    it goes with the queue)."""
    pipe = _pipelines.get(queue)
    if pipe is None:
        pipe = _pipelines[queue] = ReplicaPipeline()
    return pipe


def reduce_scatter_unit_hybrid_async(
    unit: Unit,
    grads: Mapping[str, torch.Tensor],
    *,
    layout: HybridLayout,
    dtype: torch.dtype,
    out_dtype: torch.dtype = torch.float32,
    use_all_reduce: bool = False,
    pipeline: ReplicaPipeline | None = None,
) -> tuple[dict[str, torch.Tensor], Pending]:
    """Average a unit's full gradients over all ranks into this rank's shard, without waiting.

    The reduce-scatter in the shard group is issued now; ``pending.wait()`` waits for it and
    issues the all-reduce of the reduced shard (in ``dtype``, ``1/S`` of the unit) across the
    replicas, whose end casts it into the returned ``out_dtype`` shards. Without ``pipeline``
    that all-reduce is waited at once; with one, it is waited by the pipeline (by the time the
    pipeline's last reduction is waited). ``use_all_reduce`` replaces the reduce-scatter with an
    all-reduce plus slice (``reduce_scatter: false``).
    """
    chunks = unit.chunk_grads(grads, dtype)  # [S, numel per rank]
    if layout.shard_size > 1:
        _same_on_every_rank("reduce-scatter in the shard group", unit, chunks, layout.shard_group)
    if layout.shard_size == 1:
        work, shard = None, chunks[0]
    elif use_all_reduce:
        work = dist.all_reduce(chunks, op=dist.ReduceOp.AVG, group=layout.shard_group, async_op=True)
        shard = chunks[layout.shard_rank]
    else:
        shard = chunks.new_empty(unit.shard_numel)
        work = _reduce_scatter_flat(
            shard, chunks.view(-1), op=dist.ReduceOp.AVG, group=layout.shard_group, async_op=True
        )
    out = torch.empty(unit.shard_numel, dtype=out_dtype, device=shard.device)
    if pipeline is not None:
        pipeline.register()

    def across_replicas() -> None:
        # A contiguous copy of the row (after an all-reduce the [S, numel] buffer can go).
        reduced = shard.clone() if use_all_reduce and layout.shard_size > 1 else shard
        _same_on_every_rank(_REPLICA_LABEL, unit, reduced, layout.replicate_group)
        ar = dist.all_reduce(reduced, op=dist.ReduceOp.AVG, group=layout.replicate_group, async_op=True)
        replicas = Pending(ar, lambda: out.copy_(reduced), (_REPLICA_LABEL, unit))
        if pipeline is None:
            replicas.wait()
        else:
            pipeline.issued(replicas)

    return unit.split_shard(out), Pending(work, across_replicas, ("reduce-scatter", unit))


def _same_on_every_rank(op: str, unit: Unit, buffer: torch.Tensor, group: Any) -> None:
    """The SPMD check (``FUNCZERO_SPMD_CHECK``) before one of this module's collectives."""
    if spmd_check_enabled():
        check_same_collective(
            lambda: f"{op} of unit {unit.name!r} ({buffer.numel()} {buffer.dtype})",
            group=group, device=buffer.device,
        )
