"""Watchdog that kills worker process groups when the launcher dies.

Run as ``python -I watchdog.py KILL_TIMEOUT`` (stdlib only: it must not import the
package, which may be slow to import). Protocol on stdin, one command per line:
``pgid N`` adds a process group, ``exit`` ends quietly. End-of-file without
``exit`` means the launcher died: SIGTERM every group, SIGKILL what is left after
``KILL_TIMEOUT`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

__all__ = ["kill_groups", "main"]


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_groups(pgids: set[int], timeout: float) -> None:
    """SIGTERM each process group, then SIGKILL the ones still present after ``timeout``."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_group_exists(g) for g in pgids):
        time.sleep(0.05)
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    """Read the launcher's commands until ``exit`` or end-of-file."""
    timeout = float(argv[1]) if len(argv) > 1 else 30.0
    # A Ctrl+C or hang-up meant for the launcher must not take the watchdog down.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    pgids: set[int] = set()
    for line in sys.stdin.buffer:
        command, _, value = line.decode(errors="replace").strip().partition(" ")
        if command == "exit":
            return 0
        if command == "pgid" and value.isdigit():
            pgids.add(int(value))
    kill_groups(pgids, timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
