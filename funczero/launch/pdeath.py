"""Exec wrapper that gives an elastic worker a parent-death signal.

torch.distributed.elastic starts workers without ``PR_SET_PDEATHSIG``, so a
SIGKILLed agent orphans them. The agent runs ``python -I pdeath.py PARENT_PID --
CMD...`` instead of ``CMD``: this sets the signal (kept across ``execve``) and then
replaces itself with ``CMD``, so no extra process remains. When
``FUNCZERO_WATCHDOG_DIR`` is set it also registers its process group there, for
the agent's watchdog to kill grandchildren too. Stdlib only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    """Set the parent-death signal, check the parent is still alive, exec the command."""
    if len(argv) < 4 or argv[2] != "--":
        print("usage: pdeath.py PARENT_PID -- CMD [ARGS...]", file=sys.stderr)
        return 2
    parent, cmd = int(argv[1]), argv[3:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the agent died before prctl took effect
            return 128 + int(signal.SIGTERM)
    watchdog_dir = os.environ.pop("FUNCZERO_WATCHDOG_DIR", None)
    # torch starts each worker in its own session, so its group id is its pid.
    if watchdog_dir and os.getpgid(0) == os.getpid():
        try:
            open(os.path.join(watchdog_dir, str(os.getpid())), "w").close()
        except OSError:
            pass  # the parent-death signal still covers the worker itself
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"funczero launch: cannot start {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
