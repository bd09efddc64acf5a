"""ZeRO stages 0-3 as explicit compositions of collectives.

========  ====================  =======================  ===============  =====================
stage     params at rest        gradients                optimizer state  after the update
========  ====================  =======================  ===============  =====================
0         full, replicated      all-reduce (average)     full             cast master -> params
1         full, replicated      reduce-scatter at the    shard            all-gather params
                                accumulation boundary
2         full, replicated      reduce-scatter per unit  shard            all-gather params
                                during backward
3         shard               reduce-scatter per unit  shard            nothing (stay sharded)
                                during backward; params
                                all-gathered per unit on
                                use, re-gathered for
                                backward
========  ====================  =======================  ===============  =====================

A :class:`~funczero.parallel.plan.ZeroPlan` (built by :func:`build_plan`) is the frozen description of one run: the module, the stage, the precision,
the units and every parameter's :class:`~funczero.parallel.sharding.ShardSpec`. The functions below
(``forward_backward``, ``reduce_grads``, ``gather_params_after_update``) are what
:func:`funczero.make_train_step` composes; each is a few lines over the collectives in
:mod:`funczero.parallel.collectives` and :mod:`funczero.parallel.gather`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from funczero import tree
from funczero.module import apply_module
from funczero.parallel.collectives import (
    all_gather_unit_async,
    all_reduce_mean_,
    reduce_scatter_unit,
)
from funczero.parallel.gather import (
    Prefetcher,
    ReduceQueue,
    Regather,
    UnitComm,
    materialize_unit,
    wrap_unit_forward,
)
from funczero.parallel.sharding import Unit
from funczero.parallel.plan import ZeroPlan, build_plan, default_wrap_policy

__all__ = [
    "ZeroPlan",
    "build_plan",
    "default_wrap_policy",
    "forward_backward",
    "gather_params_after_update",
    "init_params",
    "reduce_grads",
    "reduces_in_backward",
    "sync_buffers",
]

Tensors = dict[str, torch.Tensor]
LossFn = Callable[[Callable[..., Any], Any], Any]


def init_params(plan: ZeroPlan, full: Mapping[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
    """Lay out full fp32 parameters as this rank's ``(params, master)`` for the plan's stage.

    ``params`` are what the model runs on (compute dtype; full, or fp32 shards at stage 3);
    ``master`` are the fp32 weights the optimizer updates (trainable only; shards from stage 1).
    Where the two would be equal, they are the same tensor.
    """
    compute = plan.precision.compute_dtype
    params: Tensors = {}
    master: Tensors = {}
    trainable = set(plan.trainable)
    for n in plan.spec.params:
        x = full[n].detach().to(torch.float32)
        if plan.master_sharded and n in trainable:
            master[n] = plan.specs[n].shard(x, plan.rank)
        elif n in trainable:
            master[n] = x.clone()
        if plan.is_sharded(n):
            params[n] = master[n] if n in trainable else plan.specs[n].shard(x, plan.rank)
        elif n in master and master[n].shape == x.shape and compute == torch.float32:
            params[n] = master[n]
        else:
            params[n] = x.to(compute).clone()
    return params, master


@contextlib.contextmanager
def _stage3_units(
    plan: ZeroPlan, comms: Mapping[str, UnitComm], anchors: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    wrapped = []
    try:
        for name, comm in comms.items():
            if name == "":
                continue
            mod = plan.module.get_submodule(name)
            mod.forward = wrap_unit_forward(  # type: ignore[method-assign]
                mod, plan.slots[name], comm, anchors, remat=plan.remat
            )
            wrapped.append(mod)
        yield
    finally:
        for mod in wrapped:
            del mod.forward


def reduces_in_backward(plan: ZeroPlan, reduce: bool) -> bool:
    """Whether :func:`forward_backward` returns gradients already reduced over ranks.

    Stages 2-3 always reduce during backward. Stages 0-1 do when asked (``reduce``: the last
    micro-batch, with nothing accumulated) and there is more than one rank, so the reduction of
    each unit overlaps the backward of the next; otherwise :func:`reduce_grads` reduces after.
    """
    return plan.stage >= 2 or (reduce and plan.world_size > 1)


def forward_backward(
    plan: ZeroPlan,
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    master: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    batch: Any,
    loss_multiplier: torch.Tensor,
    *,
    reduce: bool = False,
) -> tuple[torch.Tensor, Any, Tensors, Tensors]:
    """Run ``loss_fn`` on one micro-batch and differentiate it.

    Returns ``(loss, aux, grads, new_buffers)``. Gradients are of ``loss * loss_multiplier``:
    local full gradients (compute dtype) for stages 0-1, already averaged fp32 shards for 2-3.
    With ``reduce`` (see :func:`reduces_in_backward`) stages 0-1 also reduce during backward and
    return averaged fp32 gradients: full for stage 0, shards for stage 1.
    """
    out_buffers: dict[str, Tensors] = {}

    def run(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        def model(*args: Any, **kwargs: Any) -> Any:
            y, new = apply_module(plan.module, plan.spec, tensors, buffers, *args, **kwargs)
            out_buffers["b"] = new
            return y

        out = loss_fn(model, batch)
        loss, aux = out if isinstance(out, tuple) else (out, None)
        # A detached aux cannot keep the autograd graph (and its activations) alive.
        aux = tree.map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"loss_fn must return a 0-d loss tensor (or (loss, aux)); got {type(loss)}")
        return loss, aux

    trainable = plan.trainable
    queue = ReduceQueue()
    regather: Regather | None = None
    prefetch: Prefetcher | None = None
    try:
        with torch.enable_grad():
            if not reduces_in_backward(plan, reduce):
                leaves = {n: params[n].detach().requires_grad_() for n in trainable}
                loss, aux = run({**params, **leaves})
                inputs = list(leaves.values())
            else:
                anchors = {n: master[n].detach().requires_grad_() for n in trainable}
                regather = Regather() if plan.stage == 3 else None
                roots, blocks, persistent, shared = _step_units(plan)

                def comm_of(unit: Unit, *, keep: bool = False) -> UnitComm:
                    replicated = plan.stage <= 2 or unit is plan.persistent
                    gu = plan.grad_unit(unit)
                    return UnitComm(
                        unit=unit,
                        trainable=gu.params,
                        grad_unit=gu,
                        full=params if replicated else None,
                        shards=None if replicated else params,
                        group=plan.group,
                        rank=plan.rank,
                        compute_dtype=plan.precision.compute_dtype,
                        reduce_dtype=plan.precision.reduce_dtype,
                        use_all_reduce=plan.use_all_reduce,
                        regather=None if replicated or keep else regather,
                        mode="all_reduce" if plan.stage == 0 else "reduce_scatter",
                        queue=queue,
                        wait_now=bool(shared & set(gu.params)),
                    )

                # The root stays gathered through backward (FSDP2 keeps its root too): backward
                # starts with it, so a re-gather could not overlap anything.
                root_comms = [comm_of(u, keep=True) for u in roots]
                comms = {u.name: comm_of(u) for u in blocks}
                tensors: Tensors = {}
                for unit in persistent:
                    tensors.update(materialize_unit(comm_of(unit), anchors))
                if plan.stage <= 2:
                    for comm in (*root_comms, *comms.values()):
                        tensors.update(materialize_unit(comm, anchors))
                    loss, aux = run(tensors)
                else:
                    assert regather is not None
                    prefetch = _stage3_prefetcher(plan, comms, root_comms)
                    with regather.hooks(), _stage3_units(plan, comms, anchors):
                        root: Tensors = {}
                        for comm in root_comms:
                            root.update(materialize_unit(comm, anchors))
                        try:
                            loss, aux = run({**tensors, **root})
                        finally:
                            del root
                            prefetch.end_forward()
                    # The order this forward ran the units in: the next step prefetches in it.
                    plan._cache["forward_order"] = tuple(c.unit.name for c in prefetch.order)
                inputs = [anchors[n] for n in trainable]
            grads_list = torch.autograd.grad(loss * loss_multiplier, inputs, allow_unused=True)
    finally:
        # Every issued collective is waited (its buffers are held until then), even on error.
        queue.drain()
        if prefetch is not None:
            prefetch.drain()
        if regather is not None:
            regather.clear()
    grads = {
        n: torch.zeros_like(x) if g is None else g for n, x, g in zip(trainable, inputs, grads_list)
    }
    return loss.detach(), aux, grads, out_buffers.get("b", dict(buffers))


def _stage3_prefetcher(
    plan: ZeroPlan, comms: Mapping[str, UnitComm], roots: Sequence[UnitComm]
) -> Prefetcher:
    """Attach a prefetcher to the stage-3 units, planned in the last forward's order, and issue
    the root's gathers with the first unit's."""
    units = list(comms.values())
    seen = plan._cache.get("forward_order")
    if seen is not None and set(seen) == set(comms):
        units = [comms[name] for name in dict.fromkeys(seen)]
    prefetch = Prefetcher(units)
    for comm in (*roots, *units):
        comm.prefetch = prefetch
    prefetch.start(roots)
    return prefetch


def _step_units(
    plan: ZeroPlan,
) -> tuple[tuple[Unit, ...], tuple[Unit, ...], tuple[Unit, ...], frozenset[str]]:
    """``(root parts, block units, persistent unit, shared anchors)`` of a plan (cached).

    An anchor in two units (a weight tied across stage-3 units) gets its gradient summed by
    autograd on the compute stream, so those units wait for their reduction (``wait_now``).
    """
    cached = plan._cache.get("step_units")
    if cached is None:
        roots = _root_parts(plan)
        blocks = tuple(u for u in plan.units if u.name != "")
        persistent = (plan.persistent,) if plan.persistent else ()
        seen: set[str] = set()
        shared: set[str] = set()
        for unit in (*roots, *blocks, *persistent):
            names = set(plan.grad_unit(unit).params)
            shared |= seen & names
            seen |= names
        cached = plan._cache["step_units"] = (roots, blocks, persistent, frozenset(shared))
    return cached


def _root_parts(plan: ZeroPlan) -> tuple[Unit, ...]:
    """The root unit split by top-level submodule (``wte``, ``wpe``, ``head``, ...).

    Each part gets its own boundary, so its gradients are reduced as soon as they are complete:
    an output head's while the blocks' backward runs, not with the embedding's at the very end,
    where nothing is left to overlap. At stage 3 each part also has its own gathered buffer, so
    backward keeps only the parts it reads (the head), not the embedding. With more than 8 such
    submodules the root stays whole (one collective each way).
    """
    root = next((u for u in plan.units if u.name == ""), None)
    if root is None:
        return ()
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(root.params):
        groups.setdefault(name.split(".")[0] if "." in name else "", []).append(i)
    if len(groups) > 8:
        return (root,)
    return tuple(
        Unit("", tuple(root.params[i] for i in idx), tuple(root.specs[i] for i in idx))
        for idx in groups.values()
    )


def reduce_grads(plan: ZeroPlan, grads: Tensors) -> Tensors:
    """At the accumulation boundary: average gradients over ranks into their update layout.

    Stage 0 all-reduces in buckets (in place); stage 1 reduce-scatters each unit into fp32
    shards; stages 2-3 already reduced during backward.
    """
    if plan.stage == 0:
        all_reduce_mean_(
            list(grads.values()),
            group=plan.group,
            world_size=plan.world_size,
            dtype=plan.precision.reduce_dtype,
            bucket_numel=plan.bucket_numel,
        )
        return grads
    if plan.stage == 1:
        out: Tensors = {}
        for unit in plan.units:
            gu = plan.grad_unit(unit)
            if gu.params:
                out.update(
                    reduce_scatter_unit(
                        gu,
                        grads,
                        group=plan.group,
                        rank=plan.rank,
                        dtype=plan.precision.reduce_dtype,
                        use_all_reduce=plan.use_all_reduce,
                    )
                )
        return out
    return grads


def gather_params_after_update(
    plan: ZeroPlan, params: Mapping[str, torch.Tensor], master: Mapping[str, torch.Tensor]
) -> Tensors:
    """Rebuild the compute-dtype parameters from updated master weights.

    Stage 0 casts; stages 1-2 (and stage 3's persistent parameters) all-gather the master shards
    in the compute dtype; stage 3's sharded parameters *are* their master shards.
    """
    new = dict(params)
    compute = plan.precision.compute_dtype
    if plan.stage == 0:
        for n, m in master.items():
            if new[n] is not m:
                new[n] = m.to(compute)
        return new
    units = plan.units if plan.stage in (1, 2) else ((plan.persistent,) if plan.persistent else ())
    # Two gathers in flight: unit k+1's copy-in and all-gather run while unit k is copied out.
    pending = None
    for unit in units:
        gu = plan.grad_unit(unit)
        if gu.params:
            issued = all_gather_unit_async(gu, master, group=plan.group, dtype=compute)
            if pending is not None:
                new.update(pending.wait())
            pending = issued
    if pending is not None:
        new.update(pending.wait())
    if plan.stage == 3:
        for n in plan.trainable:
            if plan.is_sharded(n):
                new[n] = master[n]
    return new


def sync_buffers(plan: ZeroPlan, buffers: Tensors) -> Tensors:
    """Average floating buffers across ranks (``buffer_sync="mean"``)."""
    floats = [b for b in buffers.values() if b.is_floating_point()]
    if plan.buffer_sync == "mean" and plan.world_size > 1 and floats:
        all_reduce_mean_(
            floats, group=plan.group, world_size=plan.world_size, dtype=torch.float32
        )
    return buffers


def gather_full(plan: ZeroPlan, tensors: Mapping[str, torch.Tensor], *, sharded: bool) -> Tensors:
    """Return full copies of ``tensors`` (parameter-keyed), all-gathering them if ``sharded``.

    Collective when ``sharded`` and ``world_size > 1``: every rank must call it. Meant for
    evaluation, export and tests, not the hot path.
    """
    out: Tensors = {}
    for n, t in tensors.items():
        spec = plan.specs[n]
        if not sharded:
            out[n] = t.detach().clone()
        elif plan.world_size == 1:
            out[n] = spec.full([t.detach()])
        else:
            parts = [torch.empty_like(t) for _ in range(plan.world_size)]
            dist.all_gather(parts, t.detach().contiguous(), group=plan.group)
            out[n] = spec.full(parts)
    return out
