"""Process-tree plumbing: parent-death signals, subreaping, tree kill, watchdog.

Three layers keep workers from outliving the launcher:

* every worker gets ``PR_SET_PDEATHSIG`` (SIGTERM when the launcher dies, even by
  SIGKILL, which torchrun lacks);
* the launcher is a *child subreaper*, so grandchildren whose parent died are
  re-parented to it (not to init) and are still found and reaped by the tree kill;
* a watchdog process in its own session holds a pipe from the launcher; when the
  launcher dies the pipe closes and the watchdog kills each worker's process group
  (grandchildren included), escalating SIGTERM to SIGKILL after the kill timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import psutil

__all__ = [
    "Watchdog",
    "make_preexec",
    "reap_adopted_zombies",
    "set_child_subreaper",
    "terminate_descendants",
    "write_pid_file",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_WATCHDOG_SCRIPT = Path(__file__).with_name("watchdog.py")


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc.prctl


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process; return whether it worked."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def make_preexec(
    parent_pid: int, death_signal: int = signal.SIGTERM, cpus: Iterable[int] | None = None
) -> Callable[[], None]:
    """Build a ``preexec_fn`` that ties the child to ``parent_pid`` (and pins CPUs).

    Call :func:`subprocess.Popen` from the thread that lives as long as the launcher
    (the main thread): the kernel sends the death signal when the *thread* that
    forked the child exits. Start no other threads before the workers are spawned;
    ``preexec_fn`` is only safe while the parent is single-threaded.
    """
    prctl = _prctl()  # resolved before fork: the child must not load libraries
    cpu_set = frozenset(cpus) if cpus is not None else None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
            # The parent may have died between fork() and prctl(); the signal then
            # never comes, so check by hand.
            if os.getppid() != parent_pid:
                os._exit(128 + int(death_signal))
        if cpu_set:
            os.sched_setaffinity(0, cpu_set)

    return preexec


def _is_alive(proc: psutil.Process, children: dict[int, subprocess.Popen[bytes]]) -> bool:
    popen = children.get(proc.pid)
    if popen is not None:
        # Reap our own children through Popen so their return codes stay correct.
        return popen.poll() is None
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _worker_processes(children: Sequence[subprocess.Popen[bytes]]) -> dict[int, psutil.Process]:
    """Every process that belongs to the workers: their trees and their sessions.

    Workers are session leaders (``start_new_session``), so a grandchild whose parent
    died and that was re-parented to this subreaper still carries a worker's
    session id. Only processes inside those sessions are touched: the launcher may
    be embedded in a process that has other children.
    """
    sessions = {c.pid for c in children}
    found: dict[int, psutil.Process] = {}
    for child in children:
        if child.poll() is not None:
            continue  # reaped: its PID may already belong to someone else
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(child.pid)
            found[proc.pid] = proc
            for sub in proc.children(recursive=True):
                found[sub.pid] = sub
    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in psutil.Process().children(recursive=True):
            if proc.pid not in found and _session(proc.pid) in sessions:
                found[proc.pid] = proc
    return found


def terminate_descendants(
    children: Sequence[subprocess.Popen[bytes]],
    timeout: float,
    *,
    hurry: Callable[[], bool] = lambda: False,
) -> None:
    """SIGTERM every worker's whole tree, SIGKILL survivors after ``timeout``, reap.

    Covers the workers, their descendants, their process groups and anything of
    theirs re-parented to this process (see :func:`set_child_subreaper`). Returns
    once all of it is gone and reaped.

    Args:
        children: The worker ``Popen`` objects (reaped through ``Popen.poll``).
        timeout: Seconds between SIGTERM and SIGKILL.
        hurry: Returns True to skip the rest of the grace period (a second Ctrl+C).
    """
    by_pid = {c.pid: c for c in children}
    live_groups = [c.pid for c in children if c.poll() is None]
    procs = _worker_processes(children)
    for pgid in live_groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    _signal_all(procs.values(), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not hurry():
        procs.update(_worker_processes(children))  # late forks
        if not any(_is_alive(p, by_pid) for p in procs.values()):
            break
        time.sleep(0.05)
    for attempt in range(100):
        procs.update(_worker_processes(children))
        alive = [p for p in procs.values() if _is_alive(p, by_pid)]
        if not alive:
            break
        if attempt == 0:
            for pgid in live_groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        _signal_all(alive, signal.SIGKILL)
        time.sleep(0.05)
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
    reap_adopted_zombies(sessions={c.pid for c in children})


def reap_adopted_zombies(sessions: Iterable[int]) -> None:
    """``waitpid`` exited children adopted as subreaper from the given sessions.

    Only zombies whose session is a worker's are reaped, so ``Popen`` objects of
    an embedding process keep their return codes.
    """
    sessions = set(sessions)
    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in psutil.Process().children():
            if proc.pid in sessions:
                continue  # the workers themselves: Popen reaps them
            with contextlib.suppress(ChildProcessError, psutil.NoSuchProcess):
                if proc.status() == psutil.STATUS_ZOMBIE and _session(proc.pid) in sessions:
                    os.waitpid(proc.pid, os.WNOHANG)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_pid_file(path: str | Path, flag: str = "--save_pid") -> Path:
    """Write this process's PID to ``path``; the caller removes the file when done.

    Raises:
        LaunchError: If the file already names a running process.
    """
    from funczero.launch.errors import LaunchError

    path = Path(path)
    if path.exists():
        old = path.read_text().strip()
        if old.isdigit() and int(old) != os.getpid() and _pid_alive(int(old)):
            raise LaunchError(
                f"{flag} {path}: the file names running process {old}; stop it or choose "
                "another path"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    return path


class Watchdog:
    """Kill the workers' process groups if this launcher dies without cleaning up.

    The watchdog runs ``watchdog.py`` in its own session with ``python -I`` (no
    package import, so it starts fast). It reads ``pgid N`` lines from a pipe; on
    ``exit`` it leaves quietly, on end-of-file (the launcher died) it kills.
    With ``pgid_dir``, groups may also register as files in that directory.
    """

    def __init__(self, kill_timeout: float, pgid_dir: str | None = None) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        extra = [] if pgid_dir is None else [pgid_dir]
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", str(_WATCHDOG_SCRIPT), str(kill_timeout), *extra],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:  # the PDEATHSIG layer still protects the workers
            print(f"funczero launch: warning: watchdog not started: {exc}", file=sys.stderr)

    @property
    def pid(self) -> int | None:
        """The watchdog's PID, or None if it could not start."""
        return None if self._proc is None else self._proc.pid

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        with contextlib.suppress(BrokenPipeError, ValueError):
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()

    def watch(self, pgid: int) -> None:
        """Add a worker's process group."""
        self._send(f"pgid {pgid}")

    def close(self) -> None:
        """Tell the watchdog that cleanup is done and wait for it to exit."""
        if self._proc is None:
            return
        self._send("exit")
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
