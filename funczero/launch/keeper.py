"""Per-worker keeper: the worker's parent, a child subreaper, so no descendant escapes.

The per-node launcher (and, in elastic mode, torch's agent) runs
``python -I keeper.py PARENT_PID KILL_TIMEOUT -- CMD [ARGS...]`` instead of ``CMD``.
The keeper makes itself a *child subreaper*, starts ``CMD`` as its child in a
process group of its own, and waits. Because it is a subreaper, every descendant
whose parent dies is re-parented to the keeper instead of to init, whatever process
group or session it moved to (``setsid``, ``Popen(process_group=0)``, a shell with
job control), so the keeper can always find and stop the whole tree:

* SIGTERM (from the launcher, or the parent-death signal when the launcher dies,
  even by SIGKILL) stops the tree: SIGTERM to every descendant, SIGKILL to what is
  left after ``KILL_TIMEOUT`` seconds;
* SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH are forwarded to the
  worker's process group;
* when the worker exits, what it left behind is stopped the same way, and the
  keeper exits with the worker's status (killing itself with the same signal when
  the worker was killed by one), so the launcher sees the worker's own result.

Linux only (``prctl``, ``/proc``); stdlib only, so it starts fast with ``-I``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import signal
import sys
import time

__all__ = ["descendants", "main"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_FORWARDED = (
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
_WATCHED = {signal.SIGCHLD, signal.SIGTERM, *_FORWARDED}
_POLL_SECONDS = 0.05


def _prctl() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl


def _parent_pid(stat_path: str) -> tuple[int, str] | None:
    try:
        with open(stat_path, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[1]), fields[0].decode()


def descendants(root: int) -> list[int]:
    """PIDs of the live (non-zombie) descendants of ``root``, read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        info = _parent_pid(f"/proc/{name}/stat")
        if info is not None and info[1] != "Z":
            children.setdefault(info[0], []).append(int(name))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


class Keeper:
    """Runs one worker and stops its whole tree on request; see the module docstring."""

    def __init__(self, command: list[str], kill_timeout: float) -> None:
        self.command = command
        self.kill_timeout = kill_timeout
        self.worker = 0
        self.status: int | None = None  # the worker's wait status once reaped
        self.deadline: float | None = None  # SIGKILL the tree at this time

    def start(self, original_mask: set[int]) -> None:
        prctl = _prctl()
        keeper = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: undo what only the keeper needs, then exec
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, original_mask)
                os.setpgid(0, 0)
                prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
                if os.getppid() != keeper:
                    os._exit(128 + int(signal.SIGTERM))
                os.execvp(self.command[0], self.command)
            except OSError as exc:
                os.write(2, f"funczero launch: cannot start {self.command[0]!r}: {exc}\n".encode())
            os._exit(127)
        self.worker = pid
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also here, so forwarding works before the child runs

    def reap(self) -> None:
        """Collect every exited child: the worker and adopted orphans."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.worker:
                self.status = status

    def stop_tree(self) -> None:
        """SIGTERM every descendant and arm the SIGKILL deadline (once)."""
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        if self.deadline is None:
            self.deadline = time.monotonic() + self.kill_timeout

    def kill_tree(self) -> None:
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGTERM:
            self.stop_tree()
        elif signum != signal.SIGCHLD and self.status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.worker, signum)

    def wait(self, until_empty: bool) -> None:
        """Handle signals until the worker exits (or, with ``until_empty``, the tree is gone)."""
        while True:
            self.reap()
            if until_empty:
                if not descendants(os.getpid()):
                    return
            elif self.status is not None:
                return
            timeout = None
            if self.deadline is not None:
                timeout = self.deadline - time.monotonic()
                if timeout <= 0:
                    self.kill_tree()
                    timeout = _POLL_SECONDS
            if until_empty:  # orphans of other parents end without a SIGCHLD to us
                timeout = _POLL_SECONDS if timeout is None else min(timeout, _POLL_SECONDS)
            info = (
                signal.sigwaitinfo(_WATCHED)
                if timeout is None
                else signal.sigtimedwait(_WATCHED, timeout)
            )
            if info is not None:
                self.on_signal(info.si_signo)


def _exit_like(status: int) -> None:
    """Exit with the worker's wait status: its code, or death by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be caught anyway
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # only reached for a signal that does not kill
    os._exit(os.waitstatus_to_exitcode(status))


def main(argv: list[str]) -> int:
    """Run ``CMD`` under this keeper; exit with its status."""
    if len(argv) < 5 or argv[3] != "--":
        print("usage: keeper.py PARENT_PID KILL_TIMEOUT -- CMD [ARGS...]", file=sys.stderr)
        return 2
    parent, kill_timeout, command = int(argv[1]), float(argv[2]), argv[4:]
    prctl = _prctl()
    # The launcher sets this too; torch's elastic agent does not.
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 128 + int(signal.SIGTERM)
    prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    original_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    keeper = Keeper(command, kill_timeout)
    keeper.start(original_mask)
    keeper.wait(until_empty=False)
    if descendants(os.getpid()):
        keeper.stop_tree()  # what the worker left behind
        keeper.wait(until_empty=True)
    keeper.reap()
    assert keeper.status is not None
    _exit_like(keeper.status)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv))
