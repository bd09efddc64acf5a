"""Per-rank output: console lines prefixed ``[rankN]:``, optional log file, tail.

Each worker's stdout and stderr are pipes read by one thread each. Lines go to the
launcher's stdout/stderr with a rank prefix, to ``LOG_DIR/rank-NNNNN.log`` (both
streams, in arrival order) when ``--log_dir`` is set, and to short in-memory
tails (one per stream: which of two pipes was written first is unknowable, so a
merged tail could drop the traceback) that the launcher prints when the rank fails.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import IO, BinaryIO

__all__ = ["TAIL_LINES", "RankOutput", "log_path"]

#: Lines kept per stream for the failure report.
TAIL_LINES = {"stdout": 10, "stderr": 20}


def log_path(log_dir: str | Path, rank: int) -> Path:
    """Return the log file of global ``rank`` in ``log_dir``."""
    return Path(log_dir) / f"rank-{rank:05d}.log"


class RankOutput:
    """Collects one rank's two output streams.

    Args:
        rank: Global rank, used in the prefix and the log name.
        console_lock: Lock shared by all ranks so console lines never interleave.
        log_dir: Directory for ``rank-NNNNN.log``, or None.
    """

    def __init__(self, rank: int, console_lock: threading.Lock, log_dir: str | None) -> None:
        self.rank = rank
        self.prefix = f"[rank{rank}]: ".encode()
        self.log_file: Path | None = None if log_dir is None else log_path(log_dir, rank)
        self._console_lock = console_lock
        self._lock = threading.Lock()
        self._log: BinaryIO | None = None
        if self.log_file is not None:
            self._log = open(self.log_file, "wb")  # noqa: SIM115 - closed in close()
        self._tails = {name: collections.deque[str](maxlen=n) for name, n in TAIL_LINES.items()}
        self._threads: list[threading.Thread] = []

    def pump(self, name: str, source: IO[bytes], console: BinaryIO) -> None:
        """Start a thread copying stream ``name``'s lines to ``console`` (and the log)."""
        thread = threading.Thread(
            target=self._copy,
            args=(self._tails[name], source, console),
            name=f"rank{self.rank}-{name}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def _copy(self, tail: collections.deque[str], source: IO[bytes], console: BinaryIO) -> None:
        try:
            for line in iter(source.readline, b""):
                if not line.endswith(b"\n"):
                    line += b"\n"
                with self._lock:
                    tail.append(line.decode(errors="replace").rstrip("\n"))
                    if self._log is not None:
                        self._log.write(line)
                        self._log.flush()
                with self._console_lock:
                    try:
                        console.write(self.prefix + line)
                        console.flush()
                    except (BrokenPipeError, ValueError):
                        pass  # nobody reads the console any more; keep logging
        finally:
            source.close()

    def tail(self, name: str) -> list[str]:
        """Return the last lines this rank printed on stream ``name``."""
        with self._lock:
            return list(self._tails[name])

    def close(self, timeout: float = 2.0) -> None:
        """Wait for the pipes to drain, then close the log file."""
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
