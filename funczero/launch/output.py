"""Per-rank output: console lines prefixed ``[rankN]:``, optional log file, tail.

Each worker's stdout and stderr are pipes read by one thread each. Lines go to the
launcher's stdout/stderr with a rank prefix, to ``LOG_DIR/rank-NNNNN.log`` (both
streams, in arrival order) when ``--log_dir`` is set, and to short in-memory
tails (one per stream: which of two pipes was written first is unknowable, so a
merged tail could drop the traceback) that the launcher prints when the rank fails.

A traceback is shown once. torch prefixes a rank's traceback lines with
``[rankN]: `` itself; that prefix is dropped so the console shows one. A traceback
block identical to one another rank already showed becomes a single line naming that
rank. A rank's last traceback is held back briefly: if the rank turns out to be the
one that failed, the launcher's failure report prints it (once) instead of the
console; otherwise it reaches the console a moment later.
"""

from __future__ import annotations

import collections
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

__all__ = ["HOLD_SECONDS", "TAIL_LINES", "RankOutput", "TracebackRegistry", "log_path"]

#: Lines (a traceback counts as one) kept per stream for the failure report.
TAIL_LINES = {"stdout": 10, "stderr": 20}
#: How long a rank's last traceback waits for the rank's fate before reaching the console.
HOLD_SECONDS = 2.0

_HEADER = "Traceback (most recent call last):"
_CHAIN = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)
_PORT_IN_USE = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)


def log_path(log_dir: str | Path, rank: int) -> Path:
    """Return the log file of global ``rank`` in ``log_dir``."""
    return Path(log_dir) / f"rank-{rank:05d}.log"


@dataclass
class _Block:
    """A traceback: its lines, and where it was shown (None: not yet)."""

    lines: list[str] = field(default_factory=list)
    shown: str | None = None
    since: float = 0.0

    @property
    def key(self) -> str:
        return "\n".join(self.lines)


class TracebackRegistry:
    """Remembers which rank showed each distinct traceback (shared by a node's ranks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[str, int] = {}

    def claim(self, block_key: str, rank: int) -> int | None:
        """Record ``rank`` as showing ``block_key``; return the rank that already did."""
        with self._lock:
            owner = self._owner.setdefault(block_key, rank)
        return None if owner == rank else owner


class _TracebackScanner:
    """Splits a stream into plain lines and complete traceback blocks."""

    def __init__(self) -> None:
        self.block: _Block | None = None
        self._after_message = False  # the block's exception line was seen

    def feed(self, line: str) -> tuple[list[str], _Block | None]:
        """Return the plain lines now final and the block completed by ``line``, if any."""
        if self.block is None:
            if line == _HEADER:
                self.block = _Block([line])
                return [], None
            return [line], None
        if self._after_message:
            if line == "" or line in _CHAIN or line == _HEADER:
                self._after_message = line != _HEADER and self._after_message
                self.block.lines.append(line)
                return [], None
            done = self.finish()
            plain, _ = self.feed(line)
            return plain, done
        self.block.lines.append(line)
        if line and not line[0].isspace():
            self._after_message = True  # the exception line; a chain may follow
        return [], None

    def finish(self) -> _Block | None:
        """End the current block (end of stream, or a line that is not part of it)."""
        block, self.block, self._after_message = self.block, None, False
        if block is not None:
            while block.lines and block.lines[-1] == "":
                block.lines.pop()  # blank lines awaiting a chain that never came
        return block


class RankOutput:
    """Collects one rank's two output streams.

    Args:
        rank: Global rank, used in the prefix and the log name.
        console_lock: Lock shared by all ranks so console lines never interleave.
        log_dir: Directory for ``rank-NNNNN.log``, or None.
        tracebacks: Registry shared by the node's ranks (a private one when None).
    """

    def __init__(
        self,
        rank: int,
        console_lock: threading.Lock,
        log_dir: str | None,
        tracebacks: TracebackRegistry | None = None,
    ) -> None:
        self.rank = rank
        self.prefix = f"[rank{rank}]: ".encode()
        self.log_file: Path | None = None if log_dir is None else log_path(log_dir, rank)
        self._console_lock = console_lock
        self._tracebacks = tracebacks or TracebackRegistry()
        self._lock = threading.Lock()
        self._log: BinaryIO | None = None
        if self.log_file is not None:
            self._log = open(self.log_file, "wb")  # noqa: SIM115 - closed in close()
        self._tails: dict[str, collections.deque[str | _Block]] = {
            name: collections.deque(maxlen=n) for name, n in TAIL_LINES.items()
        }
        self._consoles: dict[str, BinaryIO] = {}
        self._held: _Block | None = None  # the last traceback, not shown yet
        self._claimed = False  # the failure report will show the held traceback
        self._threads: list[threading.Thread] = []

    def pump(self, name: str, source: IO[bytes], console: BinaryIO) -> None:
        """Start a thread copying stream ``name``'s lines to ``console`` (and the log)."""
        self._consoles[name] = console
        thread = threading.Thread(
            target=self._copy, args=(name, source), name=f"rank{self.rank}-{name}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _copy(self, name: str, source: IO[bytes]) -> None:
        scanner = _TracebackScanner() if name == "stderr" else None
        try:
            for raw in iter(source.readline, b""):
                raw = raw.removeprefix(self.prefix)  # torch's own prefix: show ours once
                line = raw.decode(errors="replace").rstrip("\n")
                with self._lock:
                    if self._log is not None:
                        self._log.write(raw if raw.endswith(b"\n") else raw + b"\n")
                        self._log.flush()
                if scanner is None:
                    self._plain(name, line)
                    continue
                plain, block = scanner.feed(line)
                self._stderr_lines(plain, block)
            if scanner is not None:
                self._stderr_lines([], scanner.finish())
        finally:
            source.close()

    def _stderr_lines(self, plain: list[str], block: _Block | None) -> None:
        if block is None and not plain:
            return
        self._show_held()  # more output came: the held traceback was not the last word
        if block is not None:
            block.since = time.monotonic()
            with self._lock:
                self._tails["stderr"].append(block)
                self._held = block
            if plain:  # the lines came after the block
                self._show_held()
        for line in plain:
            self._plain("stderr", line)

    def _plain(self, name: str, line: str) -> None:
        with self._lock:
            self._tails[name].append(line)
        self._write(name, [line])

    def _write(self, name: str, lines: list[str]) -> None:
        data = b"".join(self.prefix + line.encode(errors="replace") + b"\n" for line in lines)
        with self._console_lock:
            try:
                self._consoles[name].write(data)
                self._consoles[name].flush()
            except (BrokenPipeError, ValueError):
                pass  # nobody reads the console any more; keep logging

    def _show_held(self, older_than: float | None = None) -> None:
        with self._lock:
            block = self._held
            if block is None or self._claimed:
                return
            if older_than is not None and time.monotonic() - block.since < older_than:
                return
            self._held = None
        owner = self._tracebacks.claim(block.key, self.rank)
        if owner is None:
            block.shown = "above"
            self._write("stderr", block.lines)
        else:
            block.shown = f"above, as rank {owner}'s"
            self._write("stderr", [f"(traceback identical to rank {owner}'s; not repeated)"])

    def release_held(self, max_age: float = HOLD_SECONDS) -> None:
        """Show the held traceback if it has waited ``max_age`` seconds (call periodically)."""
        self._show_held(older_than=max_age)

    def claim_held(self) -> None:
        """Keep the held traceback for :meth:`report`; other ranks' copies point to it."""
        with self._lock:
            self._claimed = True
            block = self._held
        if block is None:
            return
        owner = self._tracebacks.claim(block.key, self.rank)
        if owner is not None:  # another rank already showed the same traceback
            with self._lock:
                self._held = None
            block.shown = f"above, as rank {owner}'s"

    def tail(self, name: str) -> list[str]:
        """Return the last lines this rank printed on stream ``name`` (tracebacks in full)."""
        with self._lock:
            entries = list(self._tails[name])
        return [line for e in entries for line in ([e] if isinstance(e, str) else e.lines)]

    def report(self, say: Callable[[str], None], master_port: int | None = None) -> None:
        """Print this (failed) rank's log path, last lines and traceback to stderr.

        A traceback already shown on the console is named, not repeated.
        """
        if self.log_file:
            say(f"full log of rank {self.rank}: {self.log_file}")
        with self._lock:
            tails = {name: list(entries) for name, entries in self._tails.items()}
        in_use = False
        for name, entries in tails.items():
            lines: list[str] = []
            for entry in entries:
                if isinstance(entry, str):
                    lines.append(entry)
                elif entry.shown is None:
                    lines.extend(entry.lines)
                else:
                    lines.append(f"(traceback shown {entry.shown})")
            in_use = in_use or any(_PORT_IN_USE.search(line) for line in lines)
            if lines:
                say(f"last {len(lines)} {name} line(s) of rank {self.rank}:")
                print("".join(f"  | {line}\n" for line in lines), end="", file=sys.stderr)
        if in_use and master_port is not None:
            say(
                f"hint: the rendezvous port {master_port} is in use on the master host (another "
                "job?); pass a free --master_port, or leave it out on a single node to get one"
            )
        sys.stderr.flush()

    def close(self, timeout: float = 2.0, *, show_held: bool = True) -> None:
        """Wait for the pipes to drain, show a held traceback, then close the log file."""
        for thread in self._threads:
            thread.join(timeout)
        if show_held:
            self._show_held()
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
