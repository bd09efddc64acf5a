"""Process-tree plumbing: parent-death signals, keepers, subreaping, tree kill.

Layers that keep workers and everything they start from outliving the launcher:

* every worker runs under a keeper (:mod:`.keeper`), a child subreaper that is
  the worker's parent: descendants whose parent died are re-parented to it, whatever
  process group or session they moved to, so it can always stop the whole tree;
* every keeper gets ``PR_SET_PDEATHSIG`` (SIGTERM when the launcher dies, even by
  SIGKILL, which torchrun lacks) and then stops its tree, escalating to SIGKILL
  after the kill timeout;
* the launcher itself is a child subreaper too, so if a keeper is killed its
  orphans come back to the launcher and are still found and reaped by the tree kill.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import psutil

__all__ = [
    "ARG_STRLEN_MAX",
    "KEEPERS_AVAILABLE",
    "keeper_argv",
    "make_preexec",
    "reap_adopted_zombies",
    "set_child_subreaper",
    "spawn_error",
    "terminate_descendants",
    "worker_pid",
    "write_pid_file",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_KEEPER_SCRIPT = Path(__file__).with_name("keeper.py")
#: Keepers need Linux (prctl, /proc); elsewhere workers are started directly.
KEEPERS_AVAILABLE = sys.platform.startswith("linux")
#: Extra seconds the launcher gives keepers, beyond the kill timeout, to stop their trees
#: before it kills what is left itself.
_KEEPER_MARGIN = 2.0
#: Linux's limit on one argument or one ``KEY=VALUE`` string of a new program (bytes,
#: with the terminating NUL): ``MAX_ARG_STRLEN``, 32 pages.
ARG_STRLEN_MAX = 131072


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


def keeper_argv(parent_pid: int, kill_timeout: float, argv: Sequence[str]) -> list[str]:
    """Command line that runs ``argv`` under a keeper (see :mod:`.keeper`).

    Example:
        >>> keeper_argv(4242, 30.0, ["python", "train.py"])[2:]  # doctest: +ELLIPSIS
        ['.../keeper.py', '4242', '30.0', '--', 'python', 'train.py']
    """
    return [
        sys.executable,
        "-I",
        str(_KEEPER_SCRIPT),
        str(parent_pid),
        str(kill_timeout),
        "--",
        *argv,
    ]


def worker_pid(keeper: subprocess.Popen[bytes]) -> int | None:
    """The PID of the worker a running keeper started, once it has started it."""
    if keeper.poll() is not None:
        return None
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(keeper.pid).children()
        if children:
            return min(children, key=lambda p: p.create_time()).pid
    return None


def spawn_error(what: str, argv: Sequence[str], env: dict[str, str], exc: Exception) -> str:
    """Explain why starting ``argv`` with ``env`` failed, naming the value at fault."""
    if isinstance(exc, OSError) and exc.errno == errno.E2BIG:
        items = [(len(a.encode()) + 1, f"argument {a[:40]!r}") for a in argv] + [
            (len(f"{k}={v}".encode()) + 1, f"variable {k}") for k, v in env.items()
        ]
        size, name = max(items)
        total = sum(n for n, _ in items)
        if size > ARG_STRLEN_MAX:
            return (
                f"cannot start {what}: its {name} is {size:,} bytes, over Linux's limit of "
                f"{ARG_STRLEN_MAX:,} bytes for one argument or variable; pass large data in a "
                "file and its path in the variable"
            )
        return (
            f"cannot start {what}: its arguments and environment take {total:,} bytes, over "
            f"the system's limit (largest: {name}, {size:,} bytes); export fewer or smaller "
            "variables"
        )
    if isinstance(exc, ValueError):  # e.g. "embedded null byte"
        return f"cannot start {what}: {exc}; remove NUL characters from its arguments and variables"
    strerror = getattr(exc, "strerror", None) or str(exc)
    return (
        f"cannot start {what}: {argv[0]!r}: {strerror}; check the script path (and that it "
        "is executable with --no_python)"
    )


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
    keepers: bool = False,
) -> None:
    """Stop every worker's whole tree, SIGKILL survivors after the grace period, reap.

    With ``keepers``, each child is a keeper (:mod:`.keeper`) that stops its own tree
    on SIGTERM and escalates to SIGKILL after ``timeout``; this function sends SIGTERM
    to the keepers only, so each process gets exactly one SIGTERM, and kills what is
    left a margin later. Without keepers it SIGTERMs the workers, their descendants,
    their process groups and anything of theirs re-parented to this process (see
    :func:`set_child_subreaper`). Returns once all of it is gone and reaped.

    Args:
        children: The ``Popen`` objects started (reaped through ``Popen.poll``).
        timeout: Seconds between SIGTERM and SIGKILL.
        hurry: Returns True to skip the rest of the grace period (a second Ctrl+C).
        keepers: Whether ``children`` are keepers.
    """
    by_pid = {c.pid: c for c in children}
    live_groups = [c.pid for c in children if c.poll() is None]
    procs = _worker_processes(children)
    if keepers:
        for child in children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        timeout += _KEEPER_MARGIN
    else:
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
    reap_adopted_zombies(sessions={c.pid for c in children}, pids=set(procs))


def reap_adopted_zombies(sessions: Iterable[int], pids: Iterable[int] = ()) -> None:
    """``waitpid`` exited children adopted as subreaper from the given sessions (or PIDs).

    Only zombies whose session is a worker's, or that were seen in a worker's tree, are
    reaped, so ``Popen`` objects of an embedding process keep their return codes.
    """
    sessions, pids = set(sessions), set(pids)
    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in psutil.Process().children():
            if proc.pid in sessions:
                continue  # the workers themselves: Popen reaps them
            with contextlib.suppress(ChildProcessError, psutil.NoSuchProcess):
                ours = proc.pid in pids or _session(proc.pid) in sessions
                if proc.status() == psutil.STATUS_ZOMBIE and ours:
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

    An existing file is replaced only if it is a stale PID file (empty, or the PID of
    a process that is gone): anything else may be the user's data.

    Raises:
        LaunchError: If the file names a running process, is not a PID file, or
            cannot be written.
    """
    from funczero.launch.errors import LaunchError

    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise LaunchError(
                f"{flag} {str(path)!r} exists and is not a regular file; pass a file path"
            )
        try:
            with open(path, "rb") as f:
                old = f.read(64).strip()
        except OSError as exc:
            raise LaunchError(f"{flag} {str(path)!r} cannot be read: {exc.strerror}") from None
        if old and not (old.isdigit() and len(old) < 20):
            raise LaunchError(
                f"{flag} {str(path)!r} exists and does not hold a PID (it starts with "
                f"{old[:20]!r}); it is not overwritten: remove it or choose another path"
            )
        if old and int(old) != os.getpid() and _pid_alive(int(old)):
            raise LaunchError(
                f"{flag} {str(path)!r}: the file names running process {int(old)}; stop it "
                "or choose another path"
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{os.getpid()}\n")
    except OSError as exc:
        raise LaunchError(f"{flag} {str(path)!r} cannot be written: {exc.strerror}") from None
    return path
