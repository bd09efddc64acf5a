"""One micro-batch's loss and gradients under a ZeRO plan.

Two programs, chosen by the stage's policy:

* gradients reduced after the step's micro-batches (stages 0-1 with accumulation): plain
  ``torch.autograd.grad`` of the loss with respect to the compute parameters; the step reduces
  them at the accumulation boundary;
* gradients reduced during backward: every unit goes through its boundary
  (:func:`~funczero.parallel.units.materialize_unit`), whose backward reduces the unit's
  gradients into fp32 *anchors* while the next unit's backward runs. Replicated units
  (stages 0-2) are materialised up front; sharded ones (stage 3) are gathered when their module
  runs, prefetched one ahead, and gathered again in backward.

Example:
    >>> import torch
    >>> from funczero.parallel.plan import build_plan
    >>> plan = build_plan(torch.nn.Linear(2, 1), stage=3)
    >>> params = {n: torch.zeros(plan.specs[n].shard_numel) for n in plan.spec.params}
    >>> loss_fn = lambda model, x: model(x).sum()
    >>> out = forward_backward(plan, loss_fn, params, params, {}, torch.ones(1, 2), torch.tensor(1.0),
    ...                        single_micro_batch=True, order=PrefetchOrder())
    >>> out.grads["weight"]
    tensor([1., 1.])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch

from funczero import tree
from funczero.module import apply_module
from funczero.parallel.overlap import PrefetchOrder, Prefetcher, ReduceQueue, Regather
from funczero.parallel.plan import ZeroPlan
from funczero.parallel.units import StepContext, materialize_unit, wrap_unit_forward

__all__ = ["ForwardBackward", "PrefetchOrder", "forward_backward"]

Tensors = dict[str, torch.Tensor]
LossFn = Callable[[Callable[..., Any], Any], Any]


class ForwardBackward(NamedTuple):
    """What :func:`forward_backward` returns.

    ``grads`` are of ``loss * loss_multiplier``: local full gradients in the compute dtype when
    not reduced in backward, else averaged fp32 gradients in the update layout (full at stage
    0, shards from stage 1); ``reduced`` says which.
    """

    loss: torch.Tensor
    aux: Any
    grads: Tensors
    buffers: Tensors
    reduced: bool


def forward_backward(
    plan: ZeroPlan,
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    master: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    batch: Any,
    loss_multiplier: torch.Tensor,
    *,
    single_micro_batch: bool,
    order: PrefetchOrder,
) -> ForwardBackward:
    """Run ``loss_fn`` on one micro-batch and differentiate it.

    Args:
        plan: the ZeRO plan.
        loss_fn: ``loss_fn(model, micro_batch) -> loss`` or ``(loss, aux)``.
        params, master, buffers: the state's compute parameters, master weights and buffers.
        batch: the micro-batch.
        loss_multiplier: what the loss is multiplied by before differentiation.
        single_micro_batch: nothing accumulates, so stages 0-1 may reduce during backward
            (:meth:`~funczero.parallel.stages.Stage.reduces_in_backward`).
        order: stage 3's prefetch order, learned by each forward for the next.
    """
    out_buffers: dict[str, Tensors] = {}

    def run(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        def model(*args: Any, **kwargs: Any) -> Any:
            y, new = apply_module(plan.module, plan.spec, tensors, buffers, *args, **kwargs)
            out_buffers["b"] = new
            return y

        return _loss_and_aux(loss_fn(model, batch))

    trainable = plan.trainable
    reduced = plan.policy.reduces_in_backward(
        single_micro_batch=single_micro_batch, world_size=plan.world_size
    )
    ctx = StepContext(params=params, queue=ReduceQueue())
    try:
        with torch.enable_grad():
            if not reduced:
                leaves = {n: params[n].detach().requires_grad_() for n in trainable}
                loss, aux = run({**params, **leaves})
                inputs = list(leaves.values())
            else:
                anchors = {n: master[n].detach().requires_grad_() for n in trainable}
                loss, aux = _run_units(plan, ctx, anchors, run, order)
                inputs = [anchors[n] for n in trainable]
            grads_list = torch.autograd.grad(loss * loss_multiplier, inputs, allow_unused=True)
    finally:
        # Every issued collective is waited (its buffers are held until then), even on error.
        assert ctx.queue is not None
        ctx.queue.drain()
        if ctx.prefetch is not None:
            ctx.prefetch.drain()
        if ctx.regather is not None:
            ctx.regather.clear()
    grads = {
        n: torch.zeros_like(x) if g is None else g for n, x, g in zip(trainable, inputs, grads_list)
    }
    return ForwardBackward(loss.detach(), aux, grads, out_buffers.get("b", dict(buffers)), reduced)


def _loss_and_aux(out: Any) -> tuple[torch.Tensor, Any]:
    loss, aux = out if isinstance(out, tuple) else (out, None)
    # A detached aux cannot keep the autograd graph (and its activations) alive.
    aux = tree.map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(f"loss_fn must return a 0-d loss tensor (or (loss, aux)); got {type(loss)}")
    return loss, aux


def _run_units(
    plan: ZeroPlan,
    ctx: StepContext,
    anchors: Mapping[str, torch.Tensor],
    run: Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, Any]],
    order: PrefetchOrder,
) -> tuple[torch.Tensor, Any]:
    """Forward with every unit behind its boundary, so backward reduces unit by unit."""
    tensors: Tensors = {}
    for su in plan.persistent_units:
        tensors.update(materialize_unit(su, ctx, anchors))
    if plan.policy.params_at_rest == "replicated":
        for su in (*plan.root_parts, *plan.blocks):
            tensors.update(materialize_unit(su, ctx, anchors))
        return run(tensors)
    # Sharded parameters: each block gathers on use, one ahead, and again in backward.
    ctx.regather = Regather(ctx.gather)
    ctx.prefetch = Prefetcher(order.planned(plan.blocks), ctx.gather_async)
    ctx.prefetch.start(plan.root_parts)
    with ctx.regather.hooks(), _gather_on_use(plan, ctx, anchors):
        root: Tensors = {}
        for su in plan.root_parts:
            root.update(materialize_unit(su, ctx, anchors))
        try:
            out = run({**tensors, **root})
        finally:
            del root
            ctx.prefetch.end_forward()
    # The order this forward ran the units in: the next step prefetches in it.
    order.record(ctx.prefetch.order)
    return out


@contextlib.contextmanager
def _gather_on_use(
    plan: ZeroPlan, ctx: StepContext, anchors: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Make each block module gather its parameters when called, for this step only."""
    wrapped = []
    try:
        for su in plan.blocks:
            mod = plan.module.get_submodule(su.unit.name)
            mod.forward = wrap_unit_forward(  # type: ignore[method-assign]
                mod, plan.slots[su.unit.name], su, ctx, anchors, remat=plan.remat
            )
            wrapped.append(mod)
        yield
    finally:
        for mod in wrapped:
            del mod.forward
