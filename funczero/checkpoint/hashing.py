"""Checksums computed while a load reads: SHA-256 on helper threads, overlapped with the reads.

``hashlib`` releases the GIL while it hashes a large buffer, so a chunk's blocks can be hashed
on helper threads while the next blocks are read (``os.preadv`` releases it too). Each chunk is
hashed on one *lane*, a single-thread executor that takes its blocks in order, and a new chunk
goes to the lane with the fewest bytes waiting, so a load hashes on every core it may use
while one thread reads: verification costs the reads (almost) no time until hashing, not the
disk, is the slower of the two.

SHA-256 stays the checksum: with the SHA extensions of current x86 and ARM CPUs it is the
fastest algorithm ``hashlib`` has (about 1 GB/s a core on the development VM, BLAKE2b 0.36 GB/s),
and lanes scale it with cores. See ``docs/checkpoint-format.md``.

Example:
    >>> import hashlib
    >>> data = memoryview(b"abc" * 1000)
    >>> stream = lanes().start()
    >>> _ = stream.update(data[:1000]); _ = stream.update(data[1000:])
    >>> stream.digest().result() == hashlib.sha256(data).hexdigest()
    True
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ChunkHash", "HashLanes", "lanes"]

_T = TypeVar("_T")

MAX_LANES = 8
"""Most hashing threads a process starts (a rank rarely gets more cores than that)."""


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class HashLanes:
    """Single-thread executors, one per usable core (at most :data:`MAX_LANES`).

    Args:
        n: number of lanes (default: the cores this process may run on, capped).
    """

    def __init__(self, n: int | None = None) -> None:
        n = max(1, min(MAX_LANES, _usable_cores()) if n is None else n)
        self._pools = [
            concurrent.futures.ThreadPoolExecutor(1, f"funczero-sha256-{i}") for i in range(n)
        ]
        self._waiting = [0] * len(self._pools)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pools)

    def start(self) -> ChunkHash:
        """A new SHA-256 stream on the lane with the fewest bytes waiting to be hashed."""
        with self._lock:
            lane = min(range(len(self._pools)), key=self._waiting.__getitem__)
        return ChunkHash(self, lane)

    def _submit(
        self, lane: int, nbytes: int, fn: Callable[..., _T], *args: Any
    ) -> concurrent.futures.Future[_T]:
        with self._lock:
            self._waiting[lane] += nbytes

        def run() -> _T:
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._waiting[lane] -= nbytes

        return self._pools[lane].submit(run)


class ChunkHash:
    """The SHA-256 of one chunk, fed block by block in order on one lane.

    The caller must keep each block's memory unchanged until the future :meth:`update`
    returned is done (or until :meth:`digest`'s is).
    """

    def __init__(self, lanes: HashLanes, lane: int) -> None:
        self._lanes = lanes
        self._lane = lane
        self._hash = hashlib.sha256()
        self.last: concurrent.futures.Future[Any] | None = None
        """The stream's latest task: once it is done, no block of this stream is still read."""

    def update(self, block: memoryview) -> concurrent.futures.Future[None]:
        """Queue ``block`` (hashed after the blocks queued before it)."""
        self.last = self._lanes._submit(self._lane, len(block), self._hash.update, block)
        return self.last

    def digest(self) -> concurrent.futures.Future[str]:
        """Queue the end of the stream; the future's result is the hex digest."""
        self.last = self._lanes._submit(self._lane, 0, self._hash.hexdigest)
        return self.last


_LANES: tuple[int, HashLanes] | None = None


def lanes() -> HashLanes:
    """This process's lanes (a forked child gets its own: threads do not fork)."""
    global _LANES
    if _LANES is None or _LANES[0] != os.getpid():
        _LANES = (os.getpid(), HashLanes())
    return _LANES[1]
