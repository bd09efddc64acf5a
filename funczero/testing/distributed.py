"""Helpers for multi-process tests: run a function on N gloo ranks with a hard timeout.

A hung collective is the usual failure of a distributed bug, so every run has a deadline after
which all ranks are killed (by PID, only the processes started here) and the call raises.

Example:
    In a test module (spawned ranks import ``fn`` by its qualified name, so it must be defined at
    the top level of an importable module; that is why the call below is not run here):

    >>> import torch
    >>> def all_reduce_ones(rank: int, world_size: int) -> None:
    ...     ones = torch.ones(1)
    ...     torch.distributed.all_reduce(ones)
    ...     assert ones.item() == world_size
    >>> run_distributed(all_reduce_ones, 2, timeout=60.0)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["free_port", "run_distributed"]


def free_port() -> int:
    """Return a TCP port that was free a moment ago on 127.0.0.1.

    Another process may take it before you bind it, so use it at once (for ``MASTER_PORT``).

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        # FUNCZERO_DIST_TIMEOUT: how long a collective waits (tests of hangs set it short).
        timeout=datetime.timedelta(seconds=float(os.environ.get("FUNCZERO_DIST_TIMEOUT", "120"))),
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0
) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    Raises:
        TimeoutError: some rank did not finish within ``timeout`` seconds (all are killed).
        RuntimeError: some rank exited non-zero.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f}s "
                    "(a hung collective?); all ranks killed"
                )
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    bad = {r: c for r, c in codes.items() if c != 0}
    if bad:
        raise RuntimeError(f"{fn.__name__}: ranks exited with codes {bad} (world size {world_size})")
