"""Shared helpers for the launcher tests: run the CLI, fake tools, process checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import psutil

HELPERS = Path(__file__).resolve().parent
REPO = HELPERS.parents[1]
CLI = HELPERS / "cli.py"

#: Hard limit for one launcher run in the tests (the suite must never hang).
RUN_TIMEOUT = 120.0


def launch_env(
    out_dir: Path, extra: Mapping[str, str] | None = None, fake_bin: Path | None = None
) -> dict[str, str]:
    """Environment for a launcher subprocess: repo importable, OUT_DIR, fake tools."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OUT_DIR"] = str(out_dir)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if fake_bin is not None:
        env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    env.update(extra or {})
    return env


def _default_signals() -> None:
    # A test run in a background job (`pytest &`) starts with SIGINT ignored, and the
    # launcher (rightly) keeps an ignored signal ignored; the tests send SIGINT on purpose.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def launch_argv(*args: str) -> list[str]:
    """Command line of ``funczero launch ARGS`` (through the torch-free bootstrap)."""
    return [sys.executable, str(CLI), "launch", *args]


def run_launch(
    args: Iterable[str], *, cwd: Path, env: Mapping[str, str], timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``funczero launch`` to completion (killed by the test after ``timeout``)."""
    return subprocess.run(
        launch_argv(*args),
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=_default_signals,
    )


def start_launch(
    args: Iterable[str], *, cwd: Path, env: Mapping[str, str]
) -> subprocess.Popen[str]:
    """Start ``funczero launch`` in the background (the caller must stop it)."""
    return subprocess.Popen(
        launch_argv(*args),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,  # noqa: PLW1509 - the test process starts no threads
    )


def finish(proc: subprocess.Popen[str], timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:
    """Wait for a started launcher; kill it (by PID) if it overstays."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"launcher did not finish in {timeout}s:\n{out}\n{err}") from None
    return proc.returncode, out, err


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until ``predicate()`` is true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_pids(out_dir: Path, count: int, timeout: float = 60.0) -> list[int]:
    """Wait for ``count`` sleeper workers to report; return the PIDs of all they started."""
    wait_for(lambda: len(list(out_dir.glob("pids-*.json"))) >= count, timeout, f"{count} workers")
    pids = []
    for path in sorted(out_dir.glob("pids-*.json")):
        record = json.loads(path.read_text())
        pids += [record["worker"], record["grandchild"], *record.get("extra", [])]
    return pids


def running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_leftovers(pids: Iterable[int]) -> None:
    """Test cleanup: SIGKILL processes this test started that are somehow still alive."""
    for pid in pids:
        if running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def read_records(out_dir: Path, pattern: str = "rank-*.json") -> dict[int, dict]:
    """Load the workers' JSON records keyed by global rank."""
    records = {}
    for path in out_dir.glob(pattern):
        record = json.loads(path.read_text())
        records[int(record.get("RANK", record.get("rank")))] = record
    return records


def install_fake_tools(directory: Path) -> Path:
    """Create ``ssh`` and ``pdsh`` wrappers that run the fakes with this interpreter."""
    bin_dir = directory / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    for name, script in (("ssh", "fake_ssh.py"), ("pdsh", "fake_pdsh.py")):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HELPERS / script}" "$@"\n')
        tool.chmod(0o755)
    return bin_dir


def last_line(text: str) -> str:
    """The last non-empty line of ``text``."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
