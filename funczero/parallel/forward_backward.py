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
    >>> params = {n: torch.zeros(plan.shard_specs[n].shard_numel) for n in plan.spec.params}
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
from funczero.loss import TokenLoss
from funczero.module import ModuleBinding
from funczero.parallel.compile import UnitForwards
from funczero.parallel.overlap import PrefetchOrder, Prefetcher, ReduceQueue, Regather
from funczero.parallel.plan import ZeroPlan
from funczero.parallel.units import StepContext, materialize_unit, wrap_unit_forward

__all__ = ["ForwardBackward", "PrefetchOrder", "forward_backward", "forward_only"]

Tensors = dict[str, torch.Tensor]
_NOT_COMPILED: UnitForwards = {}
LossFn = Callable[[Callable[..., Any], Any], Any]


class ForwardBackward(NamedTuple):
    """What :func:`forward_backward` returns.

    ``grads`` are of ``loss * loss_multiplier``: local full gradients in the compute dtype when
    not reduced in backward, else averaged fp32 gradients in the update layout (full at stage
    0, shards from stage 1); ``reduced`` says which. ``count`` is the number of items the loss
    sums over when ``loss_fn`` returned a :class:`~funczero.loss.TokenLoss` (``loss`` is then
    that sum), else None.
    """

    loss: torch.Tensor
    aux: Any
    grads: Tensors
    buffers: Tensors
    reduced: bool
    count: torch.Tensor | None = None


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
    timer: Any = None,
    compiled: UnitForwards = _NOT_COMPILED,
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
        timer: marks the ``forward`` and ``backward`` phases (``timer.phase(name)``; see
            :class:`funczero.monitors.timing.PhaseTimer`), or None.
        compiled: unit FQN -> compiled forward
            (:func:`~funczero.parallel.compile.compile_unit_forwards`); units not in it run eagerly.
    """
    phase = timer.phase if timer is not None else _no_phase
    trainable = plan.trainable
    reduced = plan.policy.reduces_in_backward(
        single_micro_batch=single_micro_batch, world_size=plan.world_size
    )
    ctx = StepContext(params=params, queue=ReduceQueue())
    binding, run, out_buffers, counts = _runner(plan, loss_fn, batch, buffers)
    leaves = {n: (params if not reduced else master)[n].detach().requires_grad_() for n in trainable}
    sharded = reduced and plan.policy.params_at_rest == "shard"
    if sharded:
        ctx.regather = Regather(ctx.gather)
        ctx.prefetch = Prefetcher(order.planned(plan.blocks), ctx.gather_async)
    try:
        # The binding and the unit forwards span backward too: a recompute (activation
        # checkpointing, ours or the model's own) runs the units again there.
        with torch.enable_grad(), binding, _unit_forwards(
            plan, ctx if sharded else None, leaves, compiled=compiled
        ):
            with phase("forward"):
                if not reduced:
                    loss, aux = run({**params, **leaves})
                else:  # leaves are the fp32 anchors the unit boundaries reduce gradients into
                    loss, aux = _run_units(plan, ctx, leaves, run, order, binding)
            inputs = list(leaves.values())
            with phase("backward"):
                grads_list = torch.autograd.grad(loss * loss_multiplier, inputs, allow_unused=True)
    finally:
        ctx.close()  # waits for every issued collective, even on error
    grads = {
        n: torch.zeros_like(x) if g is None else g for n, x, g in zip(trainable, inputs, grads_list)
    }
    new_buffers = out_buffers.get("b", dict(buffers))
    return ForwardBackward(loss.detach(), aux, grads, new_buffers, reduced, counts[0])


class _Runner(NamedTuple):
    binding: ModuleBinding
    run: Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, Any]]
    out_buffers: dict[str, Tensors]
    counts: list[torch.Tensor | None]


def _runner(plan: ZeroPlan, loss_fn: LossFn, batch: Any, buffers: Mapping[str, torch.Tensor]) -> _Runner:
    """``run(params)``: ``loss_fn`` on the module bound to ``params`` (within ``binding``)."""
    binding = ModuleBinding(plan.param_slots, plan.buffer_slots)
    out_buffers: dict[str, Tensors] = {}
    counts: list[torch.Tensor | None] = [None]
    tensors: dict[str, Mapping[str, torch.Tensor]] = {}

    def model(*args: Any, **kwargs: Any) -> Any:
        # Every call starts from the state's buffers: in-place updates (BatchNorm statistics)
        # land on copies, which become the new buffers.
        new = {k: v.clone() for k, v in buffers.items()}
        binding.bind(tensors["params"], new)
        out_buffers["b"] = new
        return plan.module(*args, **kwargs)

    def run(bound: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        tensors["params"] = bound
        try:
            loss, aux, counts[0] = _loss_and_aux(loss_fn(model, batch))
        finally:
            del tensors["params"]  # what backward needs, autograd keeps
        return loss, aux

    return _Runner(binding, run, out_buffers, counts)


def forward_only(
    plan: ZeroPlan,
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    master: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    batch: Any,
    *,
    order: PrefetchOrder,
    compiled: UnitForwards = _NOT_COMPILED,
) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """``loss_fn`` on one batch without gradients: ``(loss, aux, token count or None)``.

    Stage 3 gathers each unit on use (prefetched one ahead) and frees it after, so the full
    model never exists at once. Buffers are not updated (evaluation).
    """
    ctx = StepContext(params=params)
    binding, run, _, counts = _runner(plan, loss_fn, batch, buffers)
    sharded = plan.policy.params_at_rest == "shard"
    anchors = {n: master[n] for n in plan.trainable}
    if sharded:
        ctx.prefetch = Prefetcher(order.planned(plan.blocks), ctx.gather_async)
    try:
        with torch.no_grad(), binding, _unit_forwards(
            plan, ctx if sharded else None, anchors, remat=False, compiled=compiled
        ):
            if ctx.prefetch is not None:
                ctx.prefetch.start(plan.root_parts)
            tensors: Tensors = {}
            for su in (*plan.persistent_units, *plan.root_parts, *([] if sharded else plan.blocks)):
                tensors.update(materialize_unit(su, ctx, anchors))
            loss, aux = run(tensors)
    finally:
        ctx.close()
    return loss, aux, counts[0]


def _no_phase(name: str) -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


def _loss_and_aux(out: Any) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    count = None
    if isinstance(out, TokenLoss):
        out = (out, None)
    loss, aux = out if isinstance(out, tuple) else (out, None)
    if isinstance(loss, TokenLoss):
        loss, count = loss.sum, torch.as_tensor(loss.count, device=loss.sum.device).detach().float()
    # A detached aux cannot keep the autograd graph (and its activations) alive.
    aux = tree.map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(
            f"loss_fn must return a 0-d loss tensor, a TokenLoss(sum, count), or either with aux "
            f"as (loss, aux); got {type(loss)}"
        )
    return loss, aux, count


def _run_units(
    plan: ZeroPlan,
    ctx: StepContext,
    anchors: Mapping[str, torch.Tensor],
    run: Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, Any]],
    order: PrefetchOrder,
    binding: ModuleBinding,
) -> tuple[torch.Tensor, Any]:
    """Forward with every unit behind its boundary, so backward reduces unit by unit."""
    tensors: Tensors = {}
    for su in plan.persistent_units:
        tensors.update(materialize_unit(su, ctx, anchors))
    if plan.policy.params_at_rest == "replicated":
        for su in (*plan.root_parts, *plan.blocks):
            tensors.update(materialize_unit(su, ctx, anchors))
        return run(tensors)
    # Sharded parameters: each block gathers on use (see _unit_forwards), one ahead, and again
    # in backward.
    assert ctx.prefetch is not None and ctx.regather is not None
    ctx.prefetch.start(plan.root_parts)
    with ctx.regather.hooks():
        root: Tensors = {}
        for su in plan.root_parts:
            root.update(materialize_unit(su, ctx, anchors))
        try:
            out = run({**tensors, **root})
        finally:
            # The root's gathered parameters go after forward (an embedding's backward does not
            # read its weight): only what autograd saved keeps them. Blocks recomputed in
            # backward gather their own; persistent parameters stay bound.
            binding.unbind(root)
            del root
            ctx.prefetch.end_forward()
    # The order this forward ran the units in: the next step prefetches in it.
    order.record(ctx.prefetch.order)
    return out


@contextlib.contextmanager
def _unit_forwards(
    plan: ZeroPlan,
    ctx: StepContext | None,
    anchors: Mapping[str, torch.Tensor],
    *,
    remat: bool = True,
    compiled: UnitForwards = _NOT_COMPILED,
) -> Iterator[None]:
    """For this step only, make unit modules gather their shards when called (``ctx`` given:
    stage 3), recompute their forward in backward (``plan.remat_units``, with ``remat``) and
    run their ``compiled`` forwards."""
    gathered = {su.unit.name: su for su in plan.blocks} if ctx is not None else {}
    wrapped = []
    try:
        for name in plan.wrapped:
            su = gathered.get(name)
            recompute = remat and name in plan.remat_units
            forward = compiled.get(name)
            if su is None and not recompute and forward is None:
                continue
            mod = plan.module.get_submodule(name)
            gather = (su, ctx, anchors, plan.slots[name]) if su is not None and ctx is not None else None
            mod.forward = wrap_unit_forward(mod, gather=gather, remat=recompute, forward=forward)  # type: ignore[method-assign]
            wrapped.append(mod)
        yield
    finally:
        for mod in wrapped:
            del mod.forward
