"""The keeper (exit status, signals, adopted orphans), PID files and spawn errors."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers.common import kill_leftovers, running, wait_for

from funczero.launch.errors import LaunchError
from funczero.launch.procs import ARG_STRLEN_MAX, keeper_argv, spawn_error, write_pid_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keepers need Linux")

#: Generous bound for a keeper to finish on a loaded machine.
DEADLINE = 60.0


def _keeper(command: list[str], kill_timeout: float = 1.0, **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen(keeper_argv(os.getpid(), kill_timeout, command), **kwargs)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _wait_file(path: Path) -> int:
    wait_for(path.exists, DEADLINE, str(path))
    return int(path.read_text() or 0)


@pytest.mark.parametrize(
    ("command", "returncode"),
    [
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "exit 0"], 0),
        (["sh", "-c", "kill -TERM $$"], -signal.SIGTERM),
        (["sh", "-c", "kill -KILL $$"], -signal.SIGKILL),
        (["sh", "-c", "kill -SEGV $$"], -signal.SIGSEGV),
        (["no-such-program-anywhere"], 127),
    ],
)
def test_keeper_exits_with_its_workers_status(
    tmp_path: Path, command: list[str], returncode: int
) -> None:
    keeper = _keeper(command, cwd=tmp_path, stderr=subprocess.PIPE)
    _, err = keeper.communicate(timeout=DEADLINE)
    assert keeper.returncode == returncode, err
    assert not list(tmp_path.glob("core*"))  # the keeper's own death dumps no core
    if returncode == 127:
        assert b"cannot start 'no-such-program-anywhere'" in err


def test_keeper_stops_what_the_worker_left_in_another_session(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid))\n"
    )
    keeper = _keeper(_python(code))
    try:
        assert keeper.wait(timeout=DEADLINE) == 0
        orphan = _wait_file(tmp_path / "pid")
        assert not running(orphan)  # adopted by the keeper (a subreaper) and stopped
    finally:
        kill_leftovers([keeper.pid])


def test_sigterm_stops_the_tree_and_escalates_after_the_kill_timeout(tmp_path: Path) -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "p = subprocess.Popen(['sleep', '600'], process_group=0)\n"
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n"
    )
    keeper = _keeper(_python(code), kill_timeout=1.0)
    grandchild = _wait_file(tmp_path / "pid")
    try:
        start = time.monotonic()
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(timeout=DEADLINE) == -signal.SIGKILL  # the worker ignored SIGTERM
        assert time.monotonic() - start >= 1.0
        wait_for(lambda: not running(grandchild), DEADLINE, "the grandchild to die")
    finally:
        kill_leftovers([keeper.pid, grandchild])


def test_keeper_forwards_other_signals_to_the_worker(tmp_path: Path) -> None:
    code = (
        "import os, signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda *a: got.append(1))\n"
        f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
        "deadline = time.monotonic() + 60\n"
        "while not got and time.monotonic() < deadline: time.sleep(0.01)\n"
        "sys.exit(5 if got else 1)\n"
    )
    keeper = _keeper(_python(code))
    try:
        _wait_file(tmp_path / "ready")
        keeper.send_signal(signal.SIGUSR1)
        assert keeper.wait(timeout=DEADLINE) == 5
    finally:
        kill_leftovers([keeper.pid])


def test_pid_file_is_written_and_a_stale_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.pid"
    assert write_pid_file(path) == path
    assert path.read_text() == f"{os.getpid()}\n"
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(f"{dead.pid}\n")  # a process that is gone
    write_pid_file(path)
    assert path.read_text() == f"{os.getpid()}\n"


def test_pid_file_naming_a_live_process_or_holding_data_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "run.pid"
    path.write_text(f"{os.getppid()}\n")
    with pytest.raises(LaunchError, match=f"names running process {os.getppid()}"):
        write_pid_file(path)
    path.write_bytes(b"\xff\xfe notes")
    with pytest.raises(LaunchError, match="does not hold a PID"):
        write_pid_file(path)
    assert path.read_bytes() == b"\xff\xfe notes"


def test_pid_path_that_is_a_fifo_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LaunchError, match="is not a regular file"):
        write_pid_file(fifo)


def test_spawn_errors_name_the_value_at_fault() -> None:
    big = {"SMALL": "1", "HUGE": "x" * (ARG_STRLEN_MAX + 10)}
    message = spawn_error("rank 3", ["python", "t.py"], big, OSError(errno.E2BIG, "too long"))
    assert message.startswith("cannot start rank 3: its variable HUGE is 131,088 bytes")
    many = {f"V{i}": "x" * 1000 for i in range(3000)}
    message = spawn_error("rank 0", ["python"], many, OSError(errno.E2BIG, "too long"))
    assert "arguments and environment take" in message and "export fewer" in message
    message = spawn_error("rank 1", ["python"], {}, ValueError("embedded null byte"))
    assert "remove NUL characters" in message
    message = spawn_error("rank 2", ["nope"], {}, FileNotFoundError(errno.ENOENT, "No such file"))
    assert "'nope': No such file; check the script path" in message
