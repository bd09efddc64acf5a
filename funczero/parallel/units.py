"""The autograd boundary of a unit: full parameters forward, reduced gradients backward.

A :class:`StepUnit` is what the step knows about one unit before it runs (computed once, in
:func:`~funczero.parallel.plan.build_plan`); a :class:`StepContext` is what changes every step
(the parameters, the queues). :func:`materialize_unit` applies one ``torch.autograd.Function``
whose inputs are the fp32 *anchors* being differentiated (one per trainable parameter of the
unit; their values are not read) and whose outputs are the unit's full parameters in the
compute dtype:

* a replicated unit (stages 0-2, stage 3's persistent parameters) passes its full parameters
  through (views, so the state gains no history);
* a sharded unit (stage 3) all-gathers them from the shards.

Backward reduces the unit's full gradients, which autograd has just finished summing, into the
anchors' gradients: reduce-scatter into fp32 shards (stages 1-3) or all-reduce into full fp32
gradients (stage 0), so full reduced gradients never exist for the whole model at once.

Example:
    >>> import torch
    >>> from funczero.parallel.sharding import ShardSpec, Unit
    >>> unit = Unit("blk", ("w",), (ShardSpec("w", torch.Size([2]), 1),))
    >>> su = StepUnit.of(unit, ("w",), replicated=True, reduction="reduce_scatter",
    ...                  compute_dtype=torch.float32, reduce_dtype=torch.float32)
    >>> ctx = StepContext(params={"w": torch.ones(2)})
    >>> anchor = torch.zeros(2, requires_grad=True)
    >>> full = materialize_unit(su, ctx, {"w": anchor})
    >>> (full["w"] * 3).sum().backward(); anchor.grad
    tensor([3., 3.])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from funczero.module import Slots, swap_parameters
from funczero.parallel.collectives import (
    Pending,
    all_gather_unit_async,
    all_reduce_unit_async,
    reduce_scatter_unit_async,
)
from funczero.parallel.hybrid import HybridLayout, reduce_scatter_unit_hybrid_async, replica_pipeline
from funczero.parallel.overlap import Prefetcher, ReduceQueue, Regather
from funczero.parallel.sharding import Unit

__all__ = ["StepContext", "StepUnit", "materialize_unit", "wrap_unit_forward"]

Reduction = Literal["all_reduce", "reduce_scatter"]


@dataclasses.dataclass(frozen=True, eq=False)
class StepUnit:
    """What one unit's boundary does, fixed for the whole run.

    Compared by identity: it is the key of its unit in the prefetcher and the re-gather hooks.

    Attributes:
        unit: the unit's layout (all its parameters).
        grad_unit: ``unit`` restricted to trainable parameters (what gradients are reduced over).
        replicated: full parameters are passed through (True) or all-gathered from shards.
        keep_gathered: a gathered unit stays gathered through backward (the root: backward
            starts with it, so a re-gather could not overlap anything).
        reduction: ``"reduce_scatter"`` (fp32 shard gradients) or ``"all_reduce"`` (averaged
            full fp32 gradients; stage 0).
        compute_dtype: dtype of the materialised parameters.
        reduce_dtype: dtype gradients are reduced in.
        use_all_reduce: reduce-scatter as all-reduce plus slice (``reduce_scatter: false``).
        wait_now: wait for the reduction at once (an anchor shared with another unit, whose
            gradients autograd adds on the compute stream).
        group, rank: the group shards are cut over (all data-parallel ranks, or the shard
            group) and this rank in it.
        hybrid: hybrid sharding's mesh: reduced shards are then averaged across replicas.
    """

    unit: Unit
    grad_unit: Unit
    replicated: bool
    keep_gathered: bool
    reduction: Reduction
    compute_dtype: torch.dtype
    reduce_dtype: torch.dtype
    use_all_reduce: bool = False
    wait_now: bool = False
    group: Any = None
    rank: int = 0
    hybrid: HybridLayout | None = None

    @classmethod
    def of(cls, unit: Unit, trainable: tuple[str, ...], **facts: Any) -> StepUnit:
        """Build the step unit of ``unit`` whose trainable parameters are ``trainable``."""
        facts.setdefault("keep_gathered", False)
        return cls(unit=unit, grad_unit=unit.restrict(trainable), **facts)

    @property
    def trainable(self) -> tuple[str, ...]:
        """The unit's parameters that have anchors (in ``unit.params`` order)."""
        return self.grad_unit.params


@dataclasses.dataclass(eq=False)
class StepContext:
    """What the boundaries of one step share: the step's parameters and what is in flight.

    Attributes:
        params: the state's compute parameters (full for replicated units, shards otherwise).
        queue: issue reductions asynchronously into this queue (None: wait at once).
        prefetch: stage 3's gather prefetcher (None: gather on use).
        regather: stage 3's backward re-gather hooks (None: gathered parameters stay alive).
    """

    params: Mapping[str, torch.Tensor]
    queue: ReduceQueue | None = None
    prefetch: Prefetcher | None = None
    regather: Regather | None = None

    def gather_async(self, su: StepUnit) -> Pending:
        """Issue the all-gather of a sharded unit; ``wait()`` returns its full parameters."""
        return all_gather_unit_async(su.unit, self.params, group=su.group, dtype=su.compute_dtype)

    def gather(self, su: StepUnit) -> dict[str, torch.Tensor]:
        """The unit's full parameters (views of one buffer when gathered)."""
        if su.replicated:
            return {n: self.params[n].view_as(self.params[n]) for n in su.unit.params}
        if self.prefetch is not None:
            return self.prefetch.take(su)
        return self.gather_async(su).wait()

    def reduce(self, su: StepUnit, grads: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Reduce a unit's full gradients over ranks; the trainable parameters' fp32 gradients.

        With a queue the values arrive asynchronously (see :class:`ReduceQueue`).
        """
        gu = su.grad_unit
        if su.hybrid is not None:
            # Queued: each unit's all-reduce across replicas overlaps the next unit's backward.
            queued = self.queue is not None and not su.wait_now
            out, pending = reduce_scatter_unit_hybrid_async(
                gu, grads, layout=su.hybrid, dtype=su.reduce_dtype, use_all_reduce=su.use_all_reduce,
                pipeline=replica_pipeline(self.queue) if queued else None,
            )
        elif su.reduction == "all_reduce":
            out, pending = all_reduce_unit_async(
                gu, grads, group=su.group, world_size=gu.world_size, dtype=su.reduce_dtype
            )
        else:
            out, pending = reduce_scatter_unit_async(
                gu, grads, group=su.group, rank=su.rank, dtype=su.reduce_dtype,
                use_all_reduce=su.use_all_reduce,
            )  # fmt: skip
        if self.queue is None or su.wait_now:
            pending.wait()
        else:
            self.queue.submit(pending)
        return [out[n] for n in su.trainable]

    def close(self) -> None:
        """Wait for everything in flight and let go of the step's tensors.

        The prefetcher and the re-gather hooks call back into this context (and so hold it, and
        its parameters, in a reference cycle): dropping them here frees the step's tensors when
        the caller drops them, not at the next garbage collection.
        """
        try:
            if self.queue is not None:
                self.queue.drain()  # every issued collective is waited (it holds its buffers)
            if self.prefetch is not None:
                self.prefetch.drain()
        finally:
            if self.regather is not None:
                self.regather.clear()
            self.queue = self.prefetch = self.regather = None

    def regathers(self, su: StepUnit) -> bool:
        """Whether ``su``'s gathered parameters are dropped after forward and gathered again."""
        return self.regather is not None and not su.replicated and not su.keep_gathered


class _UnitBoundary(torch.autograd.Function):
    # The classic forward(ctx, ...) form: with a separate setup_context, every apply() binds its
    # arguments through inspect.signature (about 0.1 ms of host time per unit per pass).
    @staticmethod
    def forward(fctx: Any, su: StepUnit, ctx: StepContext, *anchors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        del anchors
        full = ctx.gather(su)
        output = tuple(full[n] for n in su.unit.params)
        fctx.su, fctx.step = su, ctx
        trainable = set(su.trainable)
        frozen = [t for n, t in zip(su.unit.params, output) if n not in trainable]
        if frozen:
            fctx.mark_non_differentiable(*frozen)
        return output

    @staticmethod
    def backward(fctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        su: StepUnit = fctx.su
        ctx: StepContext = fctx.step
        trainable = set(su.trainable)
        device = next(iter(ctx.params.values())).device
        full_grads = {
            name: g if g is not None else torch.zeros(spec.shape, dtype=su.compute_dtype, device=device)
            for name, spec, g in zip(su.unit.params, su.unit.specs, grads)
            if name in trainable
        }
        shard_grads = ctx.reduce(su, full_grads)
        if ctx.regathers(su):
            assert ctx.regather is not None
            ctx.regather.release(su)
        return (None, None, *shard_grads)


def materialize_unit(
    su: StepUnit, ctx: StepContext, anchors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply the unit boundary: full parameters whose gradients flow to ``anchors`` reduced."""
    outs = _UnitBoundary.apply(su, ctx, *(anchors[n] for n in su.trainable))
    full = dict(zip(su.unit.params, outs))
    if ctx.regathers(su):
        assert ctx.regather is not None
        ctx.regather.register(su, full)
    return full


def wrap_unit_forward(
    module: nn.Module,
    *,
    gather: tuple[StepUnit, StepContext, Mapping[str, torch.Tensor], Slots] | None,
    remat: bool,
    forward: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """A unit module's forward for one step: gather its shards on use, and/or recompute it.

    Args:
        module: the unit's module.
        gather: stage 3: ``(step unit, step context, anchors, slots)``: materialise the unit's
            parameters through its boundary, point the ``slots`` at them while it runs, and
            forget them after (the backward gathers them again). None: run on what is bound.
        remat: recompute the forward in backward instead of keeping its activations
            (non-reentrant ``torch.utils.checkpoint``; the RNG state is replayed, so gradients
            are bit-identical). The recompute runs inside the step's module binding, so
            parameters passed to the step are still in place.
        forward: what computes the unit (its compiled forward,
            :func:`~funczero.parallel.compile.compile_unit_forwards`); default the module
            class's own ``forward``.
    """
    inner = forward if forward is not None else type(module).forward.__get__(module)

    def run(*args: Any, **kwargs: Any) -> Any:
        assert gather is not None
        su, ctx, anchors, slots = gather
        full = materialize_unit(su, ctx, anchors)
        try:
            with swap_parameters(slots, full):
                return inner(*args, **kwargs)
        finally:
            if ctx.regather is not None:
                ctx.regather.unregister(full)

    body = run if gather is not None else inner
    if not remat:
        return body

    def run_checkpointed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(body, *args, use_reentrant=False, **kwargs)

    return run_checkpointed
