"""Supervise the runner's processes: one ``ssh`` per node, one ``pdsh``, or ``mpirun``/``srun``.

The first process to fail (or the first node that reports a failure through the
pdsh output marker) stops the rest, and the runner exits with that code. SIGINT /
SIGTERM / SIGHUP stop everything and exit ``128 + signal``.

Stopping is graceful first: ssh stdin pipes are closed (each node's launcher sees
end-of-file and stops its workers with its own kill timeout); pdsh gets a stop
command that SIGTERMs each node's launcher by PID; mpirun/srun get SIGTERM, which
they forward to the ranks. Processes still running after the kill timeout plus a
margin are killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import IO

from funczero.launch.errors import LaunchError, exit_code_for
from funczero.launch.node import JOB_FAILED_MARKER
from funczero.launch.procs import make_preexec, spawn_error
from funczero.launch.runners import Command

__all__ = ["Supervisor"]

#: Extra seconds a node gets beyond its kill timeout to stop and report back.
_STOP_MARGIN = 10.0
_MARKER = re.compile(JOB_FAILED_MARKER + r" (\w+) node=(\d+) code=(\d+)")


def _say(message: str) -> None:
    print(f"funczero launch: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Runs runner commands and propagates failures and signals.

    Args:
        commands: Processes to start (all run concurrently).
        kill_timeout: The nodes' SIGTERM-to-SIGKILL grace period.
        hold_stdin: Give each process a stdin pipe and close it to stop (ssh).
        stop_commands: Commands that stop the remote launchers (pdsh).
        job_id: Watch stdout for this job's failure marker (pdsh).
    """

    def __init__(
        self,
        commands: Sequence[Command],
        *,
        kill_timeout: float,
        hold_stdin: bool = False,
        stop_commands: Sequence[Command] = (),
        job_id: str | None = None,
    ) -> None:
        self.commands = list(commands)
        self.kill_timeout = kill_timeout
        self.hold_stdin = hold_stdin
        self.stop_commands = list(stop_commands)
        self.job_id = job_id
        self.procs: list[subprocess.Popen[bytes]] = []
        self._signal: int | None = None
        self._hurry = False
        self._marker: tuple[int, int] | None = None  # (node, code)
        self._threads: list[threading.Thread] = []

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self._signal is None:
            self._signal = signum
        else:
            self._hurry = True

    def _start(self) -> None:
        for command in self.commands:
            env = {**os.environ, **command.env}
            try:
                proc = subprocess.Popen(
                    command.argv,
                    env=env,
                    stdin=subprocess.PIPE if self.hold_stdin else None,
                    stdout=subprocess.PIPE if self.job_id else None,
                    # If the runner dies, its ssh/pdsh/mpirun children go too, which
                    # closes the connections the remote launchers watch.
                    # Safe: the output threads start only after every fork.
                    preexec_fn=make_preexec(os.getpid(), signal.SIGTERM),  # noqa: PLW1509
                )
            except (OSError, ValueError) as exc:
                raise LaunchError(spawn_error(command.label, command.argv, env, exc)) from None
            self.procs.append(proc)
        if self.job_id:  # threads only after every fork (preexec_fn safety)
            for proc in self.procs:
                assert proc.stdout is not None
                thread = threading.Thread(target=self._scan, args=(proc.stdout,), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _scan(self, stream: IO[bytes]) -> None:
        """Copy stdout through, hiding and recording this job's failure markers."""
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            match = _MARKER.search(line)
            if match and match.group(1) == self.job_id:
                if self._marker is None:
                    self._marker = (int(match.group(2)), int(match.group(3)))
                continue
            with contextlib.suppress(BrokenPipeError, ValueError):
                sys.stdout.buffer.write(raw)
                sys.stdout.flush()

    def _wait_for_outcome(self) -> int:
        while True:
            if self._signal is not None:
                _say(f"received {signal.Signals(self._signal).name}; stopping all nodes")
                return 128 + self._signal
            if self._marker is not None:
                node, code = self._marker
                _say(f"node {node} failed with exit code {code}; stopping the other nodes")
                return code
            running, failed = 0, None
            for command, proc in zip(self.commands, self.procs, strict=True):
                returncode = proc.poll()
                if returncode is None:
                    running += 1
                elif returncode != 0 and failed is None:
                    failed = (command, returncode)
            if failed is not None:
                for thread in self._threads:
                    thread.join(2.0)  # a failure marker naming the node may still be in the pipe
                if self._marker is not None:
                    continue
                return self._report(*failed)
            if running == 0:
                return 0
            time.sleep(0.05)

    def _report(self, command: Command, returncode: int) -> int:
        code = exit_code_for(returncode)
        hint = ""
        if command.argv[0] == "ssh" and code == 255:
            hint = (
                " (255 is ssh's code for connection errors: check that "
                "'ssh -o BatchMode=yes HOST true' works without a password)"
            )
        _say(f"{command.label} exited with code {code}{hint}; stopping the others")
        return code

    def _stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        if self.stop_commands and any(p.poll() is None for p in self.procs):
            stops = []
            for stop in self.stop_commands:  # all batches at once
                with contextlib.suppress(OSError):
                    stops.append(
                        subprocess.Popen(
                            stop.argv,
                            env={**os.environ, **stop.env},
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                        )
                    )
            for stop_proc in stops:
                try:
                    stop_proc.wait(timeout=self.kill_timeout + _STOP_MARGIN)
                except subprocess.TimeoutExpired:
                    stop_proc.kill()
                    stop_proc.wait()
        elif not self.hold_stdin:
            self._signal_all(signal.SIGTERM)  # mpirun / srun forward it to the ranks
        self._wait(self.kill_timeout + _STOP_MARGIN)
        self._signal_all(signal.SIGTERM)
        self._wait(5.0)
        self._signal_all(signal.SIGKILL)
        self._wait(5.0)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._hurry:
            if all(p.poll() is not None for p in self.procs):
                return
            time.sleep(0.05)

    def run(self) -> int:
        """Start the commands and supervise them; return the runner's exit code."""
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) != signal.SIG_IGN:
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self._start()
            code = self._wait_for_outcome()
            if code != 0:
                self._stop()
            for thread in self._threads:
                thread.join(2.0)
            return code
        finally:
            if any(p.poll() is None for p in self.procs):
                self._hurry = True
                self._signal_all(signal.SIGKILL)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
