"""The collectives ZeRO is made of, on padded unit buffers.

Collective: every rank in ``group`` must call each function here in the same order with
identically structured inputs. With ``world_size == 1`` (``group is None``) they do no
communication, so single-process runs need no process group.

Every collective here carries a label (its kind and the unit it moves): one that fails or times
out (``FUNCZERO_DIST_TIMEOUT``) raises a :class:`CollectiveError` naming it, the unit and the
step (:func:`step_scope`) on each rank. With the SPMD check on (``FUNCZERO_SPMD_CHECK=1`` or
:func:`set_spmd_check`), ranks compare each collective before issuing it
(:mod:`funczero.parallel.divergence`).

Example:
    >>> import torch
    >>> all_reduce_mean_([torch.ones(2)], group=None, world_size=1, dtype=torch.float32)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from funczero.parallel import divergence
from funczero.parallel.divergence import (
    CollectiveError,
    StepCounter,
    current_step,
    set_spmd_check,
    spmd_check_enabled,
    step_scope,
)
from funczero.parallel.sharding import Unit

# torch 2.13 renamed the flat-tensor collectives; keep working on torch >= 2.5.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = [
    "CollectiveError",
    "Pending",
    "StepCounter",
    "all_gather_labelled",
    "all_gather_unit",
    "all_gather_unit_async",
    "all_reduce_labelled",
    "all_reduce_mean_",
    "all_reduce_sum",
    "all_reduce_unit_async",
    "check_unit_collective",
    "current_step",
    "reduce_scatter_unit",
    "reduce_scatter_unit_async",
    "set_spmd_check",
    "spmd_check_enabled",
    "step_scope",
]


class Pending:
    """A collective issued with ``async_op=True``; ``wait()`` finishes it and returns its result.

    ``wait()`` makes the *current* stream wait for the collective (a stream dependency, not a
    host sync) and then runs ``finish`` on it (copy-out, cast). Call it from the stream that
    issued the collective: c10d keeps the collective's tensors alive until ``wait()`` instead of
    calling ``record_stream``, so waiting on the allocating stream is what makes their memory safe
    to reuse. Every issued collective must be waited exactly once, or its buffers stay alive.

    ``label`` (the collective, and the unit it moves) names it in the :class:`CollectiveError`
    raised when the wait fails or times out (``FUNCZERO_DIST_TIMEOUT``), so a hang names where
    each rank waits; it is formatted only then, so the hot path builds no strings.
    """

    __slots__ = ("_finish", "_label", "_result", "_work")

    def __init__(
        self, work: Any, finish: Callable[[], Any], label: tuple[str, Unit] | None = None
    ) -> None:
        self._work = work
        self._finish: Callable[[], Any] | None = finish
        self._result: Any = None
        self._label = label

    def wait(self) -> Any:
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError as e:  # DistBackendError and gloo's timeouts are RuntimeErrors
                what = _label(*self._label) if self._label else "a collective"
                raise divergence.collective_failed(what, e) from e
            self._work = None
        if self._finish is not None:
            self._result = self._finish()
            self._finish = None
        return self._result


def all_reduce_labelled(
    x: torch.Tensor, label: str, *, group: Any, op: Any = dist.ReduceOp.AVG
) -> None:
    """``dist.all_reduce`` in place; a failure is a :class:`CollectiveError` naming ``label``."""
    if divergence._enabled:
        divergence.check_same_collective(
            lambda: f"{label} ({tuple(x.shape)} {x.dtype}, {op})", group=group, device=x.device
        )
    try:
        dist.all_reduce(x, op=op, group=group)
    except RuntimeError as e:
        raise divergence.collective_failed(label, e) from e


def all_gather_labelled(
    parts: list[torch.Tensor], x: torch.Tensor, label: str, *, group: Any
) -> None:
    """``dist.all_gather(parts, x)``; a failure is a :class:`CollectiveError` naming ``label``.

    For gathers outside the step (evaluation, export), so they too name themselves and take
    part in the SPMD check.
    """
    if divergence._enabled:
        divergence.check_same_collective(
            lambda: f"{label} ({tuple(x.shape)} {x.dtype})", group=group, device=x.device
        )
    try:
        dist.all_gather(parts, x, group=group)
    except RuntimeError as e:
        raise divergence.collective_failed(label, e) from e


def _label(op: str, unit: Unit) -> str:
    name = "the root" if unit.name == "" else repr(unit.name)
    return (
        f"{op} of unit {name} ({len(unit.params)} parameters, {unit.shard_numel} elements per rank)"
    )


def check_unit_collective(op: str, unit: Unit, buffer: torch.Tensor, group: Any) -> None:
    """The SPMD check of collective ``op`` on ``unit``'s ``buffer``; call it just before issuing
    the collective, and only when :func:`spmd_check_enabled` (its description is built here)."""
    divergence.check_same_collective(
        lambda: f"{_label(op, unit)}, {buffer.dtype}", group=group, device=buffer.device
    )


def all_reduce_mean_(
    tensors: Sequence[torch.Tensor],
    *,
    group: Any,
    world_size: int,
    dtype: torch.dtype,
    bucket_numel: int = 2**27,
) -> None:
    """Average ``tensors`` across ranks in place, in buckets of at most ``bucket_numel`` elements.

    Each bucket is flattened into one buffer of ``dtype`` so a model of many small tensors costs
    a few large all-reduces rather than one per tensor.
    """
    if world_size == 1 or not tensors:
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for t in list(tensors) + [None]:  # type: ignore[list-item]
        if t is not None and (not bucket or size + t.numel() <= bucket_numel):
            bucket.append(t)
            size += t.numel()
            continue
        flat = torch.cat([b.reshape(-1).to(dtype) for b in bucket])
        all_reduce_labelled(flat, "all-reduce of a gradient bucket", group=group)
        for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
            b.copy_(part.view_as(b))
        if t is not None:
            bucket, size = [t], t.numel()


def reduce_scatter_unit(
    unit: Unit,
    grads: Mapping[str, torch.Tensor],
    *,
    group: Any,
    rank: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype = torch.float32,
    use_all_reduce: bool = False,
) -> dict[str, torch.Tensor]:
    """Average full gradients across ranks and return this rank's shard of each.

    ``use_all_reduce`` swaps the reduce-scatter for an all-reduce plus slice (DeepSpeed's
    ``reduce_scatter: false``); on gloo that is the faster of the two.
    """
    shards, pending = reduce_scatter_unit_async(
        unit, grads, group=group, rank=rank, dtype=dtype, out_dtype=out_dtype,
        use_all_reduce=use_all_reduce,
    )  # fmt: skip
    pending.wait()
    return shards


def reduce_scatter_unit_async(
    unit: Unit,
    grads: Mapping[str, torch.Tensor],
    *,
    group: Any,
    rank: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype = torch.float32,
    use_all_reduce: bool = False,
) -> tuple[dict[str, torch.Tensor], Pending]:
    """Issue :func:`reduce_scatter_unit` without waiting.

    Returns the shard tensors at once (their values are valid only after ``pending.wait()``)
    and the :class:`Pending` collective.
    """
    chunks = unit.chunk_grads(grads, dtype)  # [W, S]
    world = unit.world_size
    work = None
    if world == 1:
        shard = chunks[0]
    elif use_all_reduce:
        if divergence._enabled:
            check_unit_collective("reduce-scatter (as an all-reduce)", unit, chunks, group)
        work = dist.all_reduce(chunks, op=dist.ReduceOp.AVG, group=group, async_op=True)
        shard = chunks[rank]
    else:
        if divergence._enabled:
            check_unit_collective("reduce-scatter", unit, chunks, group)
        shard = chunks.new_empty(unit.shard_numel)
        work = _reduce_scatter_flat(
            shard, chunks.view(-1), op=dist.ReduceOp.AVG, group=group, async_op=True
        )
    if shard.dtype == out_dtype and not (use_all_reduce and world > 1):
        return unit.split_shard(shard), Pending(work, lambda: None, ("reduce-scatter", unit))
    # The cast (or, after an all-reduce, the copy that lets the [W, S] buffer go: a view would
    # keep W times the shard alive) must wait for the data: hand out the output buffer now.
    out = torch.empty(unit.shard_numel, dtype=out_dtype, device=shard.device)
    return unit.split_shard(out), Pending(work, lambda: out.copy_(shard), ("reduce-scatter", unit))


def all_reduce_unit_async(
    unit: Unit,
    grads: Mapping[str, torch.Tensor],
    *,
    group: Any,
    world_size: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], Pending]:
    """Average a unit's full gradients across ranks (one flat all-reduce), without waiting.

    Returns full averaged gradients of ``out_dtype`` (views of one buffer; valid after
    ``pending.wait()``) and the :class:`Pending` collective. Stage 0's per-unit bucket.
    """
    sizes = [s.numel for s in unit.specs]
    device = grads[unit.params[0]].device
    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
    # copy_ casts while it copies: one pass instead of cast-then-concatenate.
    torch._foreach_copy_(list(flat.split(sizes)), [grads[n].reshape(-1) for n in unit.params])
    work = None
    if world_size > 1:
        if divergence._enabled:
            check_unit_collective("all-reduce", unit, flat, group)
        work = dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group, async_op=True)
    out = flat if dtype == out_dtype else torch.empty_like(flat, dtype=out_dtype)
    views = {spec.name: part.view(spec.shape) for spec, part in zip(unit.specs, out.split(sizes))}
    if out is flat:
        return views, Pending(work, lambda: None, ("all-reduce", unit))
    return views, Pending(work, lambda: out.copy_(flat), ("all-reduce", unit))


def all_gather_unit(
    unit: Unit,
    shards: Mapping[str, torch.Tensor],
    *,
    group: Any,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Gather every rank's shards of ``unit`` into full parameters of ``dtype`` (views of one buffer)."""
    return all_gather_unit_async(unit, shards, group=group, dtype=dtype).wait()


def all_gather_unit_async(
    unit: Unit,
    shards: Mapping[str, torch.Tensor],
    *,
    group: Any,
    dtype: torch.dtype,
) -> Pending:
    """Issue :func:`all_gather_unit`; ``wait()`` returns the full parameters.

    The copy-in (cast to ``dtype``) runs now on the current stream, the all-gather on the
    process group's stream, and the copy-out at ``wait()``, so the gather of the next unit can
    run while this one computes (prefetch).
    """
    send = unit.pack_shards(shards, dtype)
    if unit.world_size == 1:
        return Pending(None, lambda: unit.unpack_gathered(send))
    if divergence._enabled:
        check_unit_collective("all-gather", unit, send, group)
    gathered = send.new_empty(send.numel() * unit.world_size)
    work = _all_gather_flat(gathered, send, group=group, async_op=True)
    return Pending(work, lambda: unit.unpack_gathered(gathered), ("all-gather", unit))


def all_reduce_sum(x: torch.Tensor, *, group: Any, world_size: int) -> torch.Tensor:
    """Sum ``x`` across ranks (returns a new tensor; ``x`` untouched)."""
    if world_size == 1:
        return x
    y = x.clone()
    all_reduce_labelled(y, "all-reduce of a sum over shards", group=group, op=dist.ReduceOp.SUM)
    return y
