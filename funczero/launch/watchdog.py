"""Watchdog that kills worker process groups when the launcher dies.

Run as ``python -I watchdog.py KILL_TIMEOUT [PGID_DIR]`` (stdlib only: it must not
import the package, which may be slow to import). Protocol on stdin, one command
per line: ``pgid N`` adds a process group, ``exit`` ends quietly. End-of-file
without ``exit`` means the launcher died: SIGTERM every group, SIGKILL what is left
after ``KILL_TIMEOUT`` seconds. Groups can also be registered as empty files named
by the group id in ``PGID_DIR`` (elastic workers do this, see ``pdeath.py``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
    pgid_dir = argv[2] if len(argv) > 2 else None
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
    if pgid_dir is not None:
        with contextlib.suppress(OSError):
            pgids.update(int(name) for name in os.listdir(pgid_dir) if name.isdigit())
    kill_groups(pgids, timeout)
    if pgid_dir is not None:
        shutil.rmtree(pgid_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
