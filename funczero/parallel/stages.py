"""ZeRO stages 0-3, each one row: where tensors live and which collectives move them.

========  ==========  ==========  =================  ===========================  ====================
stage     params at   master,     gradients reduced  when                         after the update
          rest        opt state   by
========  ==========  ==========  =================  ===========================  ====================
0         replicated  replicated  all-reduce         accumulation boundary [*]_   ``cast_params``
1         replicated  shard       reduce-scatter     accumulation boundary [*]_   ``all_gather_params``
2         replicated  shard       reduce-scatter     per unit, during backward    ``all_gather_params``
3         shard       shard       reduce-scatter     per unit, during backward    ``keep_shards``
========  ==========  ==========  =================  ===========================  ====================

.. [*] With a single micro-batch (nothing to accumulate) and more than one rank, stages 0 and 1
   also reduce per unit during backward, overlapped with the next unit's backward: stage 1 with
   one micro-batch is then the same program as stage 2.

Stage 3 gathers each unit's parameters on use (forward, and again in backward) and keeps
parameters below ``stage3_param_persistence_threshold`` replicated, which it treats as stage 2
does. :func:`funczero.make_train_step` reads only the row (:class:`Stage`) of its plan's stage:
nothing else in funczero compares stage numbers.

Example:
    >>> STAGES[2].master, STAGES[2].reduces_in_backward(single_micro_batch=False, world_size=4)
    ('shard', True)
    >>> STAGES[1].reduces_in_backward(single_micro_batch=True, world_size=4)
    True
    >>> STAGES[3].rebuild_params.__name__
    'keep_shards'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist

from funczero.parallel.collectives import all_gather_labelled, all_gather_unit_async, all_reduce_mean_, reduce_scatter_unit
from funczero.parallel.hybrid import reduce_scatter_unit_hybrid_async
from funczero.parallel.sharding import Unit

if TYPE_CHECKING:
    from funczero.parallel.plan import ZeroPlan

__all__ = [
    "STAGES",
    "Stage",
    "all_gather_params",
    "all_reduce_grads",
    "cast_params",
    "gather_full",
    "keep_shards",
    "reduce_scatter_grads",
    "sync_buffers",
]

Tensors = dict[str, torch.Tensor]
Placement = Literal["replicated", "shard"]


def all_reduce_grads(plan: ZeroPlan, grads: Tensors) -> Tensors:
    """Average full gradients over ranks, in place, in buckets of ``reduce_bucket_size``."""
    all_reduce_mean_(
        list(grads.values()),
        group=plan.group,
        world_size=plan.world_size,
        dtype=plan.precision.reduce_dtype,
        bucket_numel=plan.bucket_numel,
    )
    return grads


def reduce_scatter_grads(plan: ZeroPlan, grads: Tensors) -> Tensors:
    """Average full gradients over ranks into this rank's fp32 shards, one unit at a time.

    Hybrid sharding reduce-scatters in the shard group, then averages each shard across the
    replicas (:func:`~funczero.parallel.hybrid.reduce_scatter_unit_hybrid_async`).
    """
    out: Tensors = {}
    for gu in plan.grad_units:
        if plan.hybrid is not None:
            shards, pending = reduce_scatter_unit_hybrid_async(
                gu, grads, layout=plan.hybrid, dtype=plan.precision.reduce_dtype,
                use_all_reduce=plan.use_all_reduce,
            )  # fmt: skip
            pending.wait()
            out.update(shards)
            continue
        out.update(
            reduce_scatter_unit(
                gu, grads, group=plan.group, rank=plan.rank, dtype=plan.precision.reduce_dtype,
                use_all_reduce=plan.use_all_reduce,
            )
        )  # fmt: skip
    return out


def cast_params(plan: ZeroPlan, params: Tensors, master: Tensors, *, in_place: bool) -> Tensors:
    """Replicated master weights into compute-dtype parameters: a cast.

    ``in_place`` (the old state was donated) casts into the old parameters instead of allocating
    new ones (first touches of fresh memory are slow). Parameters that *are* their master
    weights (fp32) need nothing.
    """
    casts = [n for n in plan.trainable if params[n] is not master[n]]
    if in_place:
        if casts:
            torch._foreach_copy_([params[n] for n in casts], [master[n] for n in casts])
        return dict(params)
    compute = plan.precision.compute_dtype
    return {**params, **{n: master[n].to(compute) for n in casts}}


def _all_gather_units(
    plan: ZeroPlan, units: Iterable[Unit], params: Tensors, master: Tensors
) -> Tensors:
    new = dict(params)
    # Two gathers in flight: unit k+1's copy-in and all-gather run while unit k is copied out.
    pending = None
    for gu in units:
        issued = all_gather_unit_async(gu, master, group=plan.group, dtype=plan.precision.compute_dtype)
        if pending is not None:
            new.update(pending.wait())
        pending = issued
    if pending is not None:
        new.update(pending.wait())
    return new


def all_gather_params(plan: ZeroPlan, params: Tensors, master: Tensors, *, in_place: bool) -> Tensors:
    """Sharded master weights into replicated compute-dtype parameters: one all-gather per unit."""
    del in_place  # the gathered parameters are new buffers either way
    return _all_gather_units(plan, plan.grad_units, params, master)


def keep_shards(plan: ZeroPlan, params: Tensors, master: Tensors, *, in_place: bool) -> Tensors:
    """Sharded parameters *are* their master shards; only persistent parameters are gathered."""
    del in_place
    persistent = (plan.persistent_grad_unit,) if plan.persistent_grad_unit is not None else ()
    new = _all_gather_units(plan, persistent, params, master)
    for n in plan.trainable:
        if plan.is_sharded(n):
            new[n] = master[n]
    return new


@dataclasses.dataclass(frozen=True)
class Stage:
    """One ZeRO stage: where tensors live and which collectives move them.

    Attributes:
        number: 0-3.
        params_at_rest: the compute parameters between steps: ``replicated`` or ``shard``.
        master: fp32 master weights, gradients (at the update) and optimizer state.
        grad_reduction: the collective that averages gradients: ``all_reduce`` or
            ``reduce_scatter``.
        always_reduces_in_backward: reduce each unit's gradients as soon as its backward is
            done, even when micro-batches accumulate.
        reduce_grads: the reduction at the accumulation boundary (when not done in backward).
        rebuild_params: compute parameters from updated master weights.
    """

    number: int
    params_at_rest: Placement
    master: Placement
    grad_reduction: Literal["all_reduce", "reduce_scatter"]
    always_reduces_in_backward: bool
    reduce_grads: Callable[[ZeroPlan, Tensors], Tensors]
    rebuild_params: Callable[..., Tensors]

    def reduces_in_backward(self, *, single_micro_batch: bool, world_size: int) -> bool:
        """Whether a micro-batch's gradients come out of backward already reduced.

        Stages 2-3 always; stages 0-1 for a lone micro-batch on several ranks, so each unit's
        reduction overlaps the next unit's backward instead of all running at the end.
        """
        return self.always_reduces_in_backward or (single_micro_batch and world_size > 1)

    def keeps_accumulator_apart(self, *, reduced_in_backward: bool) -> bool:
        """Whether the step must copy the first micro-batch's gradients into fp32 tensors of its
        own: the boundary all-reduce writes into its input (stage 0)."""
        return not reduced_in_backward and self.grad_reduction == "all_reduce"

    @property
    def master_sharded(self) -> bool:
        return self.master == "shard"


STAGES: Mapping[int, Stage] = {
    0: Stage(0, "replicated", "replicated", "all_reduce", False, all_reduce_grads, cast_params),
    1: Stage(1, "replicated", "shard", "reduce_scatter", False, reduce_scatter_grads, all_gather_params),
    2: Stage(2, "replicated", "shard", "reduce_scatter", True, reduce_scatter_grads, all_gather_params),
    3: Stage(3, "shard", "shard", "reduce_scatter", True, reduce_scatter_grads, keep_shards),
}


def sync_buffers(plan: ZeroPlan, buffers: Tensors) -> Tensors:
    """Average floating buffers across all data-parallel ranks (``buffer_sync="mean"``), in place."""
    floats = [b for b in buffers.values() if b.is_floating_point()]
    world = plan.data_parallel_size
    if plan.buffer_sync == "mean" and world > 1 and floats:
        all_reduce_mean_(floats, group=plan.data_parallel_group, world_size=world, dtype=torch.float32)
    return buffers


def _collective_device(group: object) -> torch.device | None:
    """Where a collective's tensors must be: the current CUDA device for NCCL, else anywhere."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def gather_full(plan: ZeroPlan, tensors: Mapping[str, torch.Tensor], *, sharded: bool) -> Tensors:
    """Return full copies of ``tensors`` (parameter-keyed), all-gathering them if ``sharded``.

    Collective when ``sharded`` and ``world_size > 1``: every rank must call it (with hybrid
    sharding it gathers inside the shard group, which holds every shard). Meant for
    evaluation, export and tests, not the hot path.
    """
    out: Tensors = {}
    device = _collective_device(plan.group)
    for n, t in tensors.items():
        spec = plan.shard_specs[n]
        if not sharded:
            out[n] = t.detach().clone()
        elif plan.world_size == 1:
            out[n] = spec.full([t.detach()])
        else:
            # Offloaded leaves live on the host; NCCL gathers device tensors only.
            x = (t.detach() if device is None else t.detach().to(device, non_blocking=True)).contiguous()
            parts = [torch.empty_like(x) for _ in range(plan.world_size)]
            all_gather_labelled(parts, x, f"all-gather of {n!r} (gather_full)", group=plan.group)
            out[n] = spec.full(parts).to(t.device)
    return out
