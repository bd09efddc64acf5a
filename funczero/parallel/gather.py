"""The autograd boundary of a unit: materialise full parameters forward, reduce gradients backward.

One ``torch.autograd.Function`` serves stages 2 and 3. Its inputs are the fp32 shard *anchors*
being differentiated (one per trainable parameter of the unit; their values are not read) and
its outputs are the unit's full parameters in the compute dtype:

* stage 2 passes replicated full parameters through (views, so the state gains no history);
* stage 3 all-gathers them from the shards.

Backward reduce-scatters the unit's full gradients, which autograd has just finished summing,
into the anchors' shard gradients, so full reduced gradients never exist for the whole model at
once. Stage 3 frees a unit's full parameters after its forward: :class:`Regather` replaces every
saved reference to them with a handle (saved-tensor hooks) and all-gathers them again when the
backward needs them, without recomputing activations (FSDP2's behaviour). Stages 0 and 1 can use
the same boundary to reduce during backward (stage 0 all-reduces a unit's full gradients).

Overlap (GPU): collectives run on the process group's stream with ``async_op=True``.
:class:`ReduceQueue` lets a unit's gradient reduction run while the next unit's backward
computes, and :class:`Prefetcher` issues stage 3's all-gather of the next unit (forward) or the
previous one (backward) while the current one computes. Waiting is a stream dependency
(``work.wait()``), never a host sync; c10d holds a collective's buffers until that wait, so no
``record_stream`` is involved and at most two units' buffers are in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from funczero.parallel.collectives import (
    Pending,
    all_gather_unit_async,
    all_reduce_unit_async,
    reduce_scatter_unit_async,
)
from funczero.parallel.sharding import Unit

__all__ = [
    "Prefetcher",
    "ReduceQueue",
    "Regather",
    "UnitComm",
    "materialize_unit",
    "swap_parameters",
]


class ReduceQueue:
    """Gradient reductions in flight during one backward.

    A unit's reduction is issued without waiting; the compute stream waits for it when the next
    unit's reduction is issued (by then the collective has long finished, so the wait costs
    nothing) and for the last ones at :meth:`drain`. Until they are waited, the returned
    gradients must not be read on the compute stream: nothing reads them before ``drain`` except
    autograd summing an anchor used by two units, and such units wait at once
    (``UnitComm.wait_now``).
    """

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self._pending: list[Pending] = []

    def submit(self, pending: Pending) -> None:
        self._pending.append(pending)
        while len(self._pending) > self.depth:
            self._pending.pop(0).wait()

    def drain(self) -> None:
        while self._pending:
            self._pending.pop(0).wait()


@dataclasses.dataclass(eq=False)
class UnitComm:
    """Everything one unit's boundary needs for one step.

    Attributes:
        unit: the unit's layout.
        trainable: the unit's parameters that have anchors (in ``unit.params`` order).
        grad_unit: ``unit`` restricted to ``trainable`` (the reduce-scatter layout).
        full: replicated full parameters (stage 2 and stage-3 persistent parameters), or None.
        shards: this rank's compute-dtype shards to all-gather (stage 3), or None.
        group, rank: the data-parallel group and this rank.
        compute_dtype: dtype of the materialised parameters.
        reduce_dtype: dtype gradients are reduced in.
        use_all_reduce: all-reduce plus slice instead of reduce-scatter.
        regather: the stage-3 backward re-gather registry (None for stage 2).
        mode: ``"reduce_scatter"`` (fp32 shard gradients; stages 1-3) or ``"all_reduce"``
            (averaged full fp32 gradients; stage 0).
        queue: issue the reduction asynchronously into this queue (None: wait at once).
        wait_now: wait for the reduction at once even with a queue (an anchor shared with another
            unit, whose gradients autograd adds on the compute stream).
        prefetch: stage 3's gather prefetcher (None: gather on use).
    """

    unit: Unit
    trainable: tuple[str, ...]
    grad_unit: Unit
    full: Mapping[str, torch.Tensor] | None
    shards: Mapping[str, torch.Tensor] | None
    group: Any
    rank: int
    compute_dtype: torch.dtype
    reduce_dtype: torch.dtype
    use_all_reduce: bool
    regather: Regather | None = None
    mode: str = "reduce_scatter"
    queue: ReduceQueue | None = None
    wait_now: bool = False
    prefetch: Prefetcher | None = None

    @property
    def device(self) -> torch.device:
        source = self.full if self.full is not None else self.shards
        assert source is not None
        return next(iter(source.values())).device

    def gather(self) -> dict[str, torch.Tensor]:
        """Return the unit's full parameters (views of one buffer when gathered)."""
        if self.full is not None:
            return {n: self.full[n].view_as(self.full[n]) for n in self.unit.params}
        if self.prefetch is not None:
            return self.prefetch.take(self)
        return self.gather_async().wait()

    def gather_async(self) -> Pending:
        """Issue the all-gather of this unit's shards; ``wait()`` returns the full parameters."""
        assert self.shards is not None
        return all_gather_unit_async(
            self.unit, self.shards, group=self.group, dtype=self.compute_dtype
        )

    def reduce(self, grads: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Reduce full gradients over ranks; return the trainable parameters' fp32 gradients.

        Shards for ``"reduce_scatter"``, full averaged gradients for ``"all_reduce"``. With a
        queue the values arrive asynchronously (see :class:`ReduceQueue`).
        """
        if self.mode == "all_reduce":
            out, pending = all_reduce_unit_async(
                self.grad_unit,
                grads,
                group=self.group,
                world_size=self.grad_unit.world_size,
                dtype=self.reduce_dtype,
            )
        else:
            out, pending = reduce_scatter_unit_async(
                self.grad_unit,
                grads,
                group=self.group,
                rank=self.rank,
                dtype=self.reduce_dtype,
                use_all_reduce=self.use_all_reduce,
            )
        if self.queue is None or self.wait_now:
            pending.wait()
        else:
            self.queue.submit(pending)
        return [out[n] for n in self.trainable]


class Prefetcher:
    """Stage 3: all-gathers issued one unit ahead, so they run while the current unit computes.

    In forward, gathering a unit issues the gather of the next unit in ``planned`` order (the
    previous step's execution order; the root's gather issues the first unit's). In backward,
    gathering a unit issues the gather of the unit that ran before it in this forward. A gather
    nobody takes is waited and dropped at :meth:`end_forward` / :meth:`drain`. Every rank runs
    the same program, so the collectives stay in the same order on all ranks.
    """

    def __init__(self, planned: Sequence[UnitComm]) -> None:
        self.planned = list(planned)
        self._pos = {c: i for i, c in enumerate(self.planned)}
        self.order: list[UnitComm] = []  # forward execution order, recorded
        self.backward = False
        self._pending: dict[UnitComm, Pending] = {}

    def issue(self, comm: UnitComm) -> None:
        if comm not in self._pending:
            self._pending[comm] = comm.gather_async()

    def start(self, roots: Sequence[UnitComm]) -> None:
        """Issue the root's gathers and the first unit's together: the first unit's then runs
        during the root's copy-out and the embedding instead of after them."""
        for root in roots:
            self.issue(root)
        if self.planned:
            self.issue(self.planned[0])

    def take(self, comm: UnitComm) -> dict[str, torch.Tensor]:
        pending = self._pending.pop(comm, None)
        full = (pending if pending is not None else comm.gather_async()).wait()
        self._ahead(comm)
        return full

    def _ahead(self, comm: UnitComm) -> None:
        """``comm`` was just gathered for use: issue the gather of the unit needed after it."""
        if not self.backward:
            if comm in self._pos:
                self.order.append(comm)
            if comm.unit.name == "" or comm in self._pos:  # a root part is followed by unit 0
                nxt = self._pos.get(comm, -1) + 1
                if nxt < len(self.planned):
                    self.issue(self.planned[nxt])
        elif comm in self.order:  # backward runs the recorded forward order in reverse
            i = self.order.index(comm)
            if i > 0:
                self.issue(self.order[i - 1])

    def end_forward(self) -> None:
        """Switch to backward order; wait for and drop gathers the forward did not use."""
        self.drain()
        self.backward = True

    def drain(self) -> None:
        for pending in self._pending.values():
            pending.wait()
        self._pending.clear()


class _UnitBoundary(torch.autograd.Function):
    # setup_context style, so the Function also works under torch.func transforms.
    @staticmethod
    def forward(comm: UnitComm, *anchors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        del anchors
        full = comm.gather()
        return tuple(full[n] for n in comm.unit.params)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        comm = inputs[0]
        ctx.comm = comm
        trainable = set(comm.trainable)
        frozen = [t for n, t in zip(comm.unit.params, output) if n not in trainable]
        if frozen:
            ctx.mark_non_differentiable(*frozen)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        comm: UnitComm = ctx.comm
        full_grads = {}
        trainable = set(comm.trainable)
        for name, spec, g in zip(comm.unit.params, comm.unit.specs, grads):
            if name in trainable:
                full_grads[name] = (
                    g
                    if g is not None
                    else torch.zeros(spec.shape, dtype=comm.compute_dtype, device=comm.device)
                )
        shard_grads = comm.reduce(full_grads)
        if comm.regather is not None:
            comm.regather.release(comm)
        return (None, *shard_grads)


def materialize_unit(comm: UnitComm, anchors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the unit boundary: full parameters whose gradients flow to ``anchors`` as shards."""
    outs = _UnitBoundary.apply(comm, *(anchors[n] for n in comm.trainable))
    full = dict(zip(comm.unit.params, outs))
    if comm.regather is not None:
        comm.regather.register(comm, full)
    return full


@dataclasses.dataclass(frozen=True)
class _Saved:
    comm: UnitComm
    offset: int
    size: torch.Size
    stride: tuple[int, ...]


class Regather:
    """Saved-tensor hooks that drop gathered parameters after forward and re-gather them in backward.

    During forward, a tensor saved for backward that lives in a unit's gathered buffer is stored
    as a handle. The first backward use all-gathers the unit again (every rank runs the same
    graph, so the collectives match across ranks); the copy is dropped when the unit's boundary
    has reduced its gradients.
    """

    def __init__(self) -> None:
        self._live: dict[int, UnitComm] = {}
        self._cache: dict[UnitComm, torch.Tensor] = {}

    @staticmethod
    def _storage_key(t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None

    def register(self, comm: UnitComm, full: Mapping[str, torch.Tensor]) -> None:
        if comm.shards is None:  # replicated parameters stay alive anyway
            return
        key = self._storage_key(next(iter(full.values())))
        if key is not None:
            self._live[key] = comm

    def unregister(self, full: Mapping[str, torch.Tensor]) -> None:
        # The storage may be reused by later allocations once freed, so forget it now.
        if full:
            self._live.pop(self._storage_key(next(iter(full.values()))) or -1, None)

    def release(self, comm: UnitComm) -> None:
        self._cache.pop(comm, None)

    def clear(self) -> None:
        self._live.clear()
        self._cache.clear()

    def pack(self, t: torch.Tensor) -> Any:
        if not self._live:
            return t
        comm = self._live.get(self._storage_key(t) or -1)
        if comm is None:
            return t
        return _Saved(comm, t.storage_offset(), t.size(), t.stride())

    def unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        base = self._cache.get(saved.comm)
        if base is None:
            base = next(iter(saved.comm.gather().values()))
            self._cache[saved.comm] = base
        return base.as_strided(saved.size, saved.stride, saved.offset)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield


@contextlib.contextmanager
def swap_parameters(
    slots: tuple[tuple[nn.Module, str, str], ...], tensors: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Temporarily point module attributes at ``tensors``.

    Args:
        slots: ``(submodule, attribute, canonical name)`` for each parameter use to replace.
        tensors: canonical name -> tensor.
    """
    saved = [(mod, attr, mod._parameters[attr]) for mod, attr, _ in slots]
    try:
        for mod, attr, name in slots:
            mod._parameters[attr] = tensors[name]  # type: ignore[assignment]
        yield
    finally:
        for mod, attr, old in saved:
            mod._parameters[attr] = old


def wrap_unit_forward(
    module: nn.Module,
    slots: tuple[tuple[nn.Module, str, str], ...],
    comm: UnitComm,
    anchors: Mapping[str, torch.Tensor],
    *,
    remat: bool,
) -> Callable[..., Any]:
    """Build a forward for a stage-3 unit module: gather, run, free (optionally recompute)."""
    inner = type(module).forward.__get__(module)

    def run(*args: Any, **kwargs: Any) -> Any:
        full = materialize_unit(comm, anchors)
        try:
            with swap_parameters(slots, full):
                return inner(*args, **kwargs)
        finally:
            if comm.regather is not None:
                comm.regather.unregister(full)

    if not remat:
        return run

    def run_checkpointed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return run_checkpointed
