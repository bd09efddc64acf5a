"""Wall-clock time of each phase of a training step, without a host sync inside the step.

``wall_clock_breakdown: true`` asks for forward, backward, gradient reduction and optimizer
times. A step marks its phases on a :class:`PhaseTimer`; the timer only *records* (CUDA events
on a GPU, ``time.perf_counter`` on the CPU, where kernels run synchronously so host timings
are the real ones) and turns the records into milliseconds in :meth:`PhaseTimer.collect`, which
the metrics logger calls once per log interval, right after its own host sync.

The step's side of the interface (``funczero.train.step`` takes an optional timer)::

    with timer.phase("forward"): ...         # loss (and the stage-3 all-gathers it waits for)
    with timer.phase("backward"): ...        # gradients, including reductions run in backward
    with timer.phase("reduce"): ...          # reductions run after backward (stages 0-1)
    with timer.phase("optimizer"): ...       # norm, unscale/clip, update, parameter rebuild
    timer.end_step()

Phases that overlap on the device (a reduce-scatter running during backward) are measured
where the step waits for them, so the phases add up to the step time.

Example:
    >>> timer = PhaseTimer("cpu")
    >>> for _ in range(2):
    ...     with timer.phase("forward"):
    ...         _ = sum(range(1000))
    ...     timer.end_step()
    >>> times = timer.collect()
    >>> sorted(times), times["forward"] >= 0.0
    (['forward'], True)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["NullTimer", "PhaseTimer"]


class PhaseTimer:
    """Records phase start/stop marks each step; :meth:`collect` gives mean ms per step.

    Args:
        device: where the step runs (``"cuda"``/``torch.device``: CUDA events on the current
            stream; anything else: host clock).
    """

    def __init__(self, device: Any = "cpu") -> None:
        self.cuda = str(device).startswith("cuda")
        self.marks: list[tuple[str, Any, Any]] = []
        self.open: dict[str, Any] = {}
        self.steps = 0

    def now(self) -> Any:
        """A time mark: a recorded CUDA event, or ``perf_counter()``."""
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        """Begin phase ``name`` (a phase may run several times per step; times add up)."""
        if name in self.open:
            raise RuntimeError(f"phase {name!r} started twice without stop({name!r})")
        self.open[name] = self.now()

    def stop(self, name: str) -> None:
        """End phase ``name``."""
        if name not in self.open:
            raise RuntimeError(f"stop({name!r}) without start({name!r})")
        self.marks.append((name, self.open.pop(name), self.now()))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """``with timer.phase("forward"): ...`` is ``start("forward")`` ... ``stop("forward")``."""
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def end_step(self) -> None:
        """Count one step (the divisor of :meth:`collect`'s means)."""
        self.steps += 1

    def collect(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase since the last call, then reset.

        On CUDA this waits for the last recorded event (call it where the host syncs anyway).
        """
        totals: dict[str, float] = {}
        if self.marks and self.cuda:
            self.marks[-1][2].synchronize()
        for name, begin, end in self.marks:
            ms = begin.elapsed_time(end) if self.cuda else (end - begin) * 1000.0
            totals[name] = totals.get(name, 0.0) + ms
        steps = max(self.steps, 1)
        self.marks, self.steps = [], 0
        return {name: total / steps for name, total in totals.items()}


class NullTimer:
    """The timer a step uses when ``wall_clock_breakdown`` is off: every call does nothing.

    Example:
        >>> with NullTimer().phase("forward"):
        ...     pass
    """

    def start(self, name: str) -> None:
        """Does nothing."""

    def stop(self, name: str) -> None:
        """Does nothing."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Does nothing."""
        yield

    def end_step(self) -> None:
        """Does nothing."""

    def collect(self) -> dict[str, float]:
        """Always ``{}``."""
        return {}
