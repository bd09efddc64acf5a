"""Progress bars for training loops and long checkpoint operations, on rank 0 only.

On a terminal they are ``rich`` bars (rich comes with typer); when stdout is not a terminal (a
log file, a pipe, ``funczero launch`` collecting each rank's output) they print plain lines
instead, so logs stay readable. ``FUNCZERO_PROGRESS=rich|plain|off`` overrides the choice.

* :class:`TrainingProgress`: step / total, loss, tokens/s, elapsed and ETA. Pass it to
  :class:`funczero.train.metrics.MetricsLogger` (``progress=``), which updates it every step and
  prints its records through it; in plain mode each record line gets the ETA appended.
* :class:`TransferProgress`: bytes done / total, rate and ETA for a checkpoint save, load,
  reshard, consolidation or export; call it with each chunk's byte count.

Example:
    >>> import io
    >>> out = io.StringIO()  # not a terminal: plain lines
    >>> with TransferProgress(3 * 2**20, "save", stream=out, rank=0, every_s=0) as bar:
    ...     for _ in range(3):
    ...         bar.advance(2**20)
    >>> out.getvalue().splitlines()[-1].startswith("save: 3.0 MiB / 3.0 MiB (100%)")
    True
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["TrainingProgress", "TransferProgress", "format_bytes", "format_duration", "progress_mode"]


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    Example:
        >>> format_bytes(3 * 2**30)
        '3.0 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``'1:02:05'``; ``None`` -> ``'?'``.

    Example:
        >>> format_duration(65), format_duration(None)
        ('0:01:05', '?')
    """
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_mode(stream: TextIO | None = None, rank: int | None = None) -> str:
    """``"off"`` off rank 0, else ``$FUNCZERO_PROGRESS`` or ``"rich"`` on a terminal, ``"plain"`` otherwise."""
    from funczero.monitors.hub import current_rank

    if (current_rank() if rank is None else rank) != 0:
        return "off"
    forced = os.environ.get("FUNCZERO_PROGRESS", "").strip().lower()
    if forced:
        if forced not in ("rich", "plain", "off"):
            raise ValueError(f"FUNCZERO_PROGRESS={forced!r} must be 'rich', 'plain' or 'off'")
        return forced
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return "rich" if isatty is not None and isatty() else "plain"


class _Bar:
    """What both bars share: the mode, a rich Progress in rich mode, context management."""

    def __init__(self, stream: TextIO | None, rank: int | None, mode: str | None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.mode = mode or progress_mode(self.stream, rank)
        self.rich: Any = None
        self.task: Any = None
        self.started = time.monotonic()

    def _start_rich(self, columns: list[Any], total: float, completed: float, **fields: Any) -> None:
        from rich.console import Console
        from rich.progress import Progress

        console = Console(file=self.stream)
        self.rich = Progress(*columns, console=console, transient=False)
        self.task = self.rich.add_task(self.description, total=total, completed=completed, **fields)
        self.rich.start()

    description = ""

    def print(self, line: str) -> None:
        """Print a line above the bar (plain mode: just the line)."""
        if self.mode == "rich":
            self.rich.console.print(line, markup=False, highlight=False)
        elif self.mode == "plain":
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self.rich is not None:
            self.rich.stop()
            self.rich = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainingProgress(_Bar):
    """A training loop's bar: step / total, loss, tokens/s, elapsed, ETA.

    Args:
        total_steps: the step the loop ends at.
        start_step: the step it starts from (after a resume), for the ETA.
        stream: where to draw (default ``sys.stdout``).
        rank: this process's rank (default from ``torch.distributed`` or ``$RANK``); not 0: silent.
        mode: ``"rich"``, ``"plain"`` or ``"off"`` (default :func:`progress_mode`).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with TrainingProgress(100, stream=out, rank=0) as bar:
        ...     bar.update(50, loss=2.0)
        ...     bar.print("step 50 | loss 2.0000")
        >>> out.getvalue().startswith("step 50 | loss 2.0000 | ETA ")
        True
    """

    description = "train"

    def __init__(self, total_steps: int, *, start_step: int = 0, stream: TextIO | None = None,
                 rank: int | None = None, mode: str | None = None) -> None:
        if total_steps < start_step:
            raise ValueError(f"total_steps={total_steps} is below start_step={start_step}")
        super().__init__(stream, rank, mode)
        self.total, self.start, self.step = total_steps, start_step, start_step
        self.fields: dict[str, Any] = {"loss": None, "tokens_per_second": None}
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self._start_rich(
                [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                 TimeRemainingColumn()],
                total_steps, start_step, stats="",
            )

    def eta(self) -> float | None:
        """Seconds left at the average pace since the start, or ``None`` before any step."""
        done = self.step - self.start
        if done <= 0:
            return None
        return (time.monotonic() - self.started) / done * (self.total - self.step)

    def update(self, step: int, **fields: float | None) -> None:
        """Move to ``step``; ``loss=`` and ``tokens_per_second=`` update the shown values."""
        self.step = step
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        if self.mode == "rich":
            stats = []
            if self.fields["loss"] is not None:
                stats.append(f"loss {self.fields['loss']:.4f}")
            if self.fields["tokens_per_second"] is not None:
                stats.append(f"{self.fields['tokens_per_second']:,.0f} tok/s")
            self.rich.update(self.task, completed=step, stats="  ".join(stats))

    def print(self, line: str) -> None:
        """Print a record line; plain mode appends the ETA."""
        if self.mode == "plain":
            line = f"{line} | ETA {format_duration(self.eta())}"
        super().print(line)


class TransferProgress(_Bar):
    """Bytes done / total, rate and ETA of a long checkpoint operation.

    Args:
        total_bytes: bytes the operation moves.
        description: what it is (``"save"``, ``"load"``, ``"reshard"``, ``"consolidate"`` ...).
        stream, rank, mode: as for :class:`TrainingProgress`.
        every_s: plain mode prints at most one line per this many seconds (and one at the end).
    """

    def __init__(self, total_bytes: int, description: str, *, stream: TextIO | None = None,
                 rank: int | None = None, mode: str | None = None, every_s: float = 5.0) -> None:
        if total_bytes < 0:
            raise ValueError(f"total_bytes={total_bytes} must be >= 0")
        super().__init__(stream, rank, mode)
        self.description = description
        self.total, self.done, self.every_s = total_bytes, 0, every_s
        self.last_print = float("-inf")
        if self.mode == "rich":
            from rich.progress import BarColumn, DownloadColumn, TextColumn
            from rich.progress import TimeRemainingColumn, TransferSpeedColumn

            self._start_rich(
                [TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                 TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn()],
                total_bytes, 0,
            )

    def __call__(self, nbytes: int) -> None:
        """Same as :meth:`advance` (so the bar can be passed as a callback)."""
        self.advance(nbytes)

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more as done."""
        self.done += nbytes
        if self.mode == "rich":
            self.rich.update(self.task, completed=self.done)
        elif self.mode == "plain":
            now = time.monotonic()
            if self.done >= self.total or now - self.last_print >= self.every_s:
                self.last_print = now
                print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """``save: 1.0 GiB / 4.0 GiB (25%), 512.0 MiB/s, ETA 0:00:06``."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return (f"{self.description}: {format_bytes(self.done)} / {format_bytes(self.total)} "
                f"({pct:.0f}%), {format_bytes(rate)}/s, ETA {format_duration(eta)}")
