"""Overlap of communication with compute inside one step: what is in flight, and in which order.

Collectives run on the process group's stream with ``async_op=True``; waiting is a stream
dependency (``Pending.wait()``), never a host sync. c10d holds a collective's buffers until that
wait, so no ``record_stream`` is involved and at most two units' buffers are in flight.

* :class:`ReduceQueue`: a unit's gradient reduction runs while the next unit's backward computes.
* :class:`Prefetcher`: stage 3 issues the all-gather of the next unit (forward) or the previous
  one (backward) while the current one computes.
* :class:`Regather`: stage 3 frees a unit's gathered parameters after its forward and gathers
  them again when backward needs them (FSDP2's behaviour), without recomputing activations.
* :class:`PrefetchOrder`: the unit order the last forward ran in, which the next step
  prefetches in. It is owned by the step function (it changes as the step runs), not the plan.

The helpers here know nothing of units' contents: they take opaque hashable keys and the gather
callables to run on them, so they import nothing from the unit boundary that uses them.

Example:
    >>> from funczero.parallel.collectives import Pending
    >>> issued = []
    >>> p = Prefetcher(["a", "b"], lambda k: issued.append(k) or Pending(None, lambda: k.upper()))
    >>> p.start(roots=())
    >>> p.take("a"), issued
    ('A', ['a', 'b'])
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch

from funczero.parallel.collectives import Pending

__all__ = ["PrefetchOrder", "Prefetcher", "ReduceQueue", "Regather"]


class ReduceQueue:
    """Gradient reductions in flight during one backward.

    A unit's reduction is issued without waiting; the compute stream waits for it when the next
    unit's reduction is issued (by then the collective has long finished, so the wait costs
    nothing) and for the last ones at :meth:`drain`. Until they are waited, the returned
    gradients must not be read on the compute stream: nothing reads them before ``drain`` except
    autograd summing an anchor used by two units, and such units wait at once.
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


class PrefetchOrder:
    """The order stage-3 units ran in during the last forward; the next step prefetches in it.

    Mutable on purpose and owned by one step function: a plan is frozen data, and the order is
    something the step learns as it runs (a model may call its blocks in any order).
    """

    def __init__(self) -> None:
        self.last: tuple[Hashable, ...] | None = None

    def planned(self, units: Sequence[Hashable]) -> list[Hashable]:
        """``units`` in the last forward's order when that forward ran exactly these units."""
        if self.last is not None and set(self.last) == set(units):
            return list(dict.fromkeys(self.last))
        return list(units)

    def record(self, ran: Sequence[Hashable]) -> None:
        self.last = tuple(ran)


class Prefetcher:
    """Stage 3: all-gathers issued one unit ahead, so they run while the current unit computes.

    In forward, taking a unit issues the gather of the next unit in ``planned`` order (a root
    part's issues the first unit's). In backward, taking a unit issues the gather of the unit
    that ran before it in this forward. A gather nobody takes is waited and dropped at
    :meth:`end_forward` / :meth:`drain`. Every rank runs the same program, so the collectives stay
    in the same order on all ranks.

    Args:
        planned: the units in the order they are expected to run (keys).
        gather_async: issues a unit's all-gather; ``wait()`` returns its full parameters.
    """

    def __init__(self, planned: Sequence[Hashable], gather_async: Callable[[Any], Pending]) -> None:
        self.planned = list(planned)
        self.gather_async = gather_async
        self._pos = {u: i for i, u in enumerate(self.planned)}
        self._roots: set[Hashable] = set()
        self.order: list[Hashable] = []  # forward execution order, recorded
        self.backward = False
        self._pending: dict[Hashable, Pending] = {}

    def issue(self, unit: Hashable) -> None:
        if unit not in self._pending:
            self._pending[unit] = self.gather_async(unit)

    def start(self, roots: Sequence[Hashable]) -> None:
        """Issue the root's gathers and the first unit's together: the first unit's then runs
        during the root's copy-out and the embedding instead of after them."""
        self._roots = set(roots)
        for root in roots:
            self.issue(root)
        if self.planned:
            self.issue(self.planned[0])

    def take(self, unit: Hashable) -> dict[str, torch.Tensor]:
        pending = self._pending.pop(unit, None)
        full = (pending if pending is not None else self.gather_async(unit)).wait()
        self._ahead(unit)
        return full

    def _ahead(self, unit: Hashable) -> None:
        """``unit`` was just gathered for use: issue the gather of the unit needed after it."""
        if not self.backward:
            if unit in self._pos:
                self.order.append(unit)
            if unit in self._roots or unit in self._pos:  # a root part is followed by unit 0
                nxt = self._pos.get(unit, -1) + 1
                if nxt < len(self.planned):
                    self.issue(self.planned[nxt])
        elif unit in self.order:  # backward runs the recorded forward order in reverse
            i = self.order.index(unit)
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


@dataclasses.dataclass(frozen=True)
class _Saved:
    unit: Hashable
    offset: int
    size: torch.Size
    stride: tuple[int, ...]


class Regather:
    """Saved-tensor hooks that drop gathered parameters after forward and re-gather them in backward.

    During forward, a tensor saved for backward that lives in a unit's gathered buffer is stored
    as a handle. The first backward use gathers the unit again with ``gather`` (every rank runs
    the same graph, so the collectives match across ranks); the copy is dropped when the unit's
    boundary has reduced its gradients (:meth:`release`).

    Args:
        gather: returns a unit's full parameters (views of one buffer).
    """

    def __init__(self, gather: Callable[[Any], Mapping[str, torch.Tensor]]) -> None:
        self.gather = gather
        self._live: dict[int, Hashable] = {}
        self._cache: dict[Hashable, torch.Tensor] = {}

    @staticmethod
    def _storage_key(t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None

    def register(self, unit: Hashable, full: Mapping[str, torch.Tensor]) -> None:
        """Track ``full`` (one unit's gathered parameters) until :meth:`unregister`."""
        key = self._storage_key(next(iter(full.values())))
        if key is not None:
            self._live[key] = unit

    def unregister(self, full: Mapping[str, torch.Tensor]) -> None:
        # The storage may be reused by later allocations once freed, so forget it now.
        if full:
            self._live.pop(self._storage_key(next(iter(full.values()))) or -1, None)

    def release(self, unit: Hashable) -> None:
        self._cache.pop(unit, None)

    def clear(self) -> None:
        self._live.clear()
        self._cache.clear()

    def pack(self, t: torch.Tensor) -> Any:
        if not self._live:
            return t
        unit = self._live.get(self._storage_key(t) or -1)
        if unit is None:
            return t
        return _Saved(unit, t.storage_offset(), t.size(), t.stride())

    def unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        base = self._cache.get(saved.unit)
        if base is None:
            base = next(iter(self.gather(saved.unit).values()))
            self._cache[saved.unit] = base
        return base.as_strided(saved.size, saved.stride, saved.offset)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield
