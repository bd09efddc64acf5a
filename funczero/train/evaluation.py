"""Evaluation under ZeRO: a forward-only step, and the trained weights back in the module.

``make_eval_step`` runs the loss without gradients; at stage 3 each unit is gathered when it
runs and freed after, so evaluation never holds the full model. ``bound_module`` puts the state's
weights back into the module (gathered where sharded, ties kept) for code that calls the module
directly, such as sampling.

Example:
    >>> import torch, funczero
    >>> from funczero.parallel.plan import build_plan
    >>> model = torch.nn.Linear(2, 1)
    >>> plan = build_plan(model, stage=3)
    >>> params, buffers = funczero.module.extract_tensors(model, plan.spec)
    >>> state = funczero.init_state(plan, funczero.optim.sgd(0.1), params, buffers)
    >>> funczero.module.release_module_tensors(model)
    >>> loss_fn = lambda m, b: m(b).pow(2).mean()
    >>> metrics = make_eval_step(loss_fn, plan)(state, torch.ones(3, 2))
    >>> sorted(metrics)
    ['loss']
    >>> with bound_module(plan, state) as m:
    ...     m(torch.ones(1, 2)).shape
    torch.Size([1, 1])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from funczero.module import ModuleBinding
from funczero.parallel.forward_backward import PrefetchOrder, forward_only
from funczero.parallel.plan import ZeroPlan
from funczero.parallel.stages import gather_full
from funczero.train.state import TrainState

__all__ = ["bound_module", "full_state_dict", "make_eval_step"]

EvalStep = Callable[[TrainState, Any], dict[str, torch.Tensor]]


def make_eval_step(loss_fn: Callable[[Callable[..., Any], Any], Any], plan: ZeroPlan) -> EvalStep:
    """Build ``eval_step(state, batch) -> metrics``: the loss on this rank's batch, no gradients.

    Collective: every rank calls it with its own batch. ``metrics["loss"]`` is the mean over
    ranks (weighted by tokens when ``loss_fn`` returns a :class:`~funczero.loss.TokenLoss`),
    ``metrics["aux"]`` this rank's aux when there is one. The state is not changed (buffers
    such as BatchNorm statistics are not updated) and nothing syncs with the host.

    Args:
        loss_fn: the training loss function (``loss_fn(model, batch)``).
        plan: the ZeRO plan the state was built with.
    """
    order = PrefetchOrder()  # stage 3 learns the units' order from each forward, for the next

    def eval_step(state: TrainState, batch: Any) -> dict[str, torch.Tensor]:
        loss, aux, count = forward_only(
            plan, loss_fn, state.params, state.master, state.buffers, batch, order=order
        )
        weight = count if count is not None else torch.ones((), device=loss.device)
        totals = torch.stack([loss.float(), weight.float()])
        world = plan.data_parallel_size  # every rank evaluates its own batch (hybrid too)
        if world > 1:
            torch.distributed.all_reduce(totals, group=plan.data_parallel_group)
        metrics = {"loss": totals[0] / (totals[1] if count is not None else world)}
        if aux is not None:
            metrics["aux"] = aux
        return metrics

    return eval_step


def full_state_dict(
    plan: ZeroPlan, state: TrainState, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The module's ``state_dict()`` from the state: every parameter under every name it has
    (tied weights under each alias) and the persistent buffers, full size, on every rank.

    Collective at stage 3 (sharded parameters are all-gathered). ``model.load_state_dict(sd,
    strict=True)`` accepts it. Parameters come from the fp32 master weights where the state has
    them (frozen ones from ``params``), cast to ``dtype`` when given.

    Example:
        >>> import torch, funczero
        >>> from funczero.parallel.plan import build_plan
        >>> model = torch.nn.Linear(2, 1)
        >>> plan = build_plan(model, stage=3)
        >>> params, buffers = funczero.module.extract_tensors(model, plan.spec)
        >>> state = funczero.init_state(plan, funczero.optim.sgd(0.1), params, buffers)
        >>> torch.nn.Linear(2, 1).load_state_dict(full_state_dict(plan, state))
        <All keys matched successfully>
    """
    master = gather_full(plan, state.master, sharded=plan.master_sharded)
    frozen = {n: state.params[n] for n in plan.spec.params if n not in master}
    master.update(gather_full(plan, {n: t for n, t in frozen.items() if plan.is_sharded(n)}, sharded=True))
    master.update({n: t.detach().clone() for n, t in frozen.items() if not plan.is_sharded(n)})
    out = {alias: master[canonical] for alias, canonical in plan.spec.aliases.items()}
    non_persistent = {
        f"{path}.{name}" if path else name
        for path, mod in plan.module.named_modules()
        for name in getattr(mod, "_non_persistent_buffers_set", ())
    }
    out.update({n: b.detach().clone() for n, b in state.buffers.items() if n not in non_persistent})
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in out.items()}


@contextlib.contextmanager
def bound_module(plan: ZeroPlan, state: TrainState, *, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """The plan's module with the state's weights in place, for calling it directly.

    Sharded parameters are all-gathered (collective at stage 3: every rank enters it) into full
    tensors of ``dtype`` (default: the compute dtype); tied weights stay tied. The module is
    released again on exit. Meant for sampling (``generate``) and export, not training.

    Args:
        plan: the ZeRO plan the state was built with.
        state: the training state.
        dtype: dtype of the bound parameters.
    """
    sharded = {n: state.params[n] for n in plan.spec.params if plan.is_sharded(n)}
    full = dict(state.params)
    full.update(gather_full(plan, sharded, sharded=True))
    cast = dtype or plan.precision.compute_dtype
    full = {n: t.detach().to(cast) for n, t in full.items()}
    with torch.no_grad(), ModuleBinding(plan.param_slots, plan.buffer_slots) as binding:
        binding.bind(full, state.buffers)
        yield plan.module
