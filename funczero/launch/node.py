"""Per-node launcher: spawn one worker per local slot and supervise them.

Run in-process by ``funczero launch`` for single-node and ``--node_rank`` jobs, and
as ``python -m funczero.launch.node`` on every node by the ssh/pdsh runners.

Supervision contract:

* a worker exiting non-zero stops all others (SIGTERM to each whole process tree,
  SIGKILL after ``kill_timeout``) and the node exits with that worker's code
  (``128 + N`` when killed by signal ``N``), naming the rank and printing its last lines;
* SIGINT / SIGTERM / SIGHUP to the launcher do the same and exit ``128 + signal``;
  a second signal skips the grace period;
* each worker runs under a keeper (:mod:`.keeper`, Linux), a child subreaper that
  holds the worker's whole tree, however it regroups (``setsid``, new process
  groups); if the launcher dies, even by SIGKILL, every keeper gets SIGTERM from the
  kernel (parent-death signal) and stops its tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from funczero.launch.errors import LaunchError, exit_code_for
from funczero.launch.output import RankOutput, TracebackRegistry
from funczero.launch.procs import (
    KEEPERS_AVAILABLE,
    keeper_argv,
    make_preexec,
    set_child_subreaper,
    spawn_error,
    terminate_descendants,
    worker_pid,
    write_pid_file,
)
from funczero.launch.spec import SCHEDULER_RANK_VARS, NodeAssignment, Program, worker_environment

__all__ = [
    "JOB_FAILED_MARKER",
    "NodeConfig",
    "WorkerPlan",
    "job_pid_file",
    "plan_workers",
    "run_node",
]

#: Printed (with the job id) to stdout when a node fails, so a pdsh runner that only
#: sees the merged output of all nodes can stop the others at once.
JOB_FAILED_MARKER = "funczero-job-failed"
_POLL_SECONDS = 0.05


def job_pid_file(job_id: str, node_rank: int | str) -> str:
    """Where a node launcher started by the pdsh runner records its PID."""
    return f"/tmp/funczero-{job_id}-node{node_rank}.pid"


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node's launcher needs.

    Attributes:
        node: This node's assignment (host, slots, ranks).
        master_addr: Address of the rank-0 host.
        master_port: Rendezvous port on the rank-0 host.
        program: The user's command.
        extra_env: Variables set for every worker (env file), before the rank variables.
        log_dir: Directory for ``rank-NNNNN.log`` files, or None.
        save_pid: File to write this launcher's PID to; ``{node_rank}`` is substituted.
        bind_cores: Pin each worker to an equal share of cores.
        core_list: Cores to share out (default: this process's affinity set).
        kill_timeout: Seconds between SIGTERM and SIGKILL when stopping workers.
        watch_stdin: Stop the workers when stdin reaches end-of-file (the ssh
            connection to the runner closed).
        job_id: Job id of a pdsh launch (enables the PID file and failure marker).
    """

    node: NodeAssignment
    master_addr: str
    master_port: int
    program: Program
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log_dir: str | None = None
    save_pid: str | None = None
    bind_cores: bool = False
    core_list: tuple[int, ...] | None = None
    kill_timeout: float = 30.0
    watch_stdin: bool = False
    job_id: str | None = None


@dataclass(frozen=True)
class WorkerPlan:
    """One worker: its ranks, the variables the launcher sets, argv and CPU set."""

    rank: int
    local_rank: int
    env: dict[str, str]
    argv: list[str]
    cpus: tuple[int, ...] | None


def _format_cores(cores: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    spans: list[list[int]] = []
    for core in cores:
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _core_shares(config: NodeConfig, count: int) -> list[tuple[int, ...]] | None:
    if not config.bind_cores:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    cores = list(config.core_list or allowed)
    missing = sorted(set(cores) - set(allowed))
    if missing:
        raise LaunchError(
            f"--bind_core_list: core(s) {_format_cores(missing)[:60]} are not available on node "
            f"{config.node.node_rank} ({config.node.host}), which may use cores "
            f"{_format_cores(allowed)}; list only those"
        )
    per_rank = len(cores) // count
    if per_rank == 0:
        raise LaunchError(
            f"--bind_cores_to_rank: {count} ranks on node {config.node.node_rank} but only "
            f"{len(cores)} core(s) ({_format_cores(cores)}); use fewer ranks or more cores"
        )
    return [tuple(cores[i * per_rank : (i + 1) * per_rank]) for i in range(count)]


def plan_workers(config: NodeConfig, environ: Mapping[str, str] | None = None) -> list[WorkerPlan]:
    """Compute every local worker's launcher-set variables and command line.

    Args:
        config: This node's configuration.
        environ: The inherited environment (``os.environ``); only consulted for
            ``OMP_NUM_THREADS``.
    """
    environ = os.environ if environ is None else environ
    count = len(config.node.slots)
    shares = _core_shares(config, count)
    plans = []
    for local_rank in range(count):
        env = dict(config.extra_env)
        env.update(
            worker_environment(config.node, local_rank, config.master_addr, config.master_port)
        )
        cpus = None if shares is None else shares[local_rank]
        if cpus is not None:
            env["OMP_NUM_THREADS"] = str(len(cpus))
        elif count > 1 and "OMP_NUM_THREADS" not in environ and "OMP_NUM_THREADS" not in env:
            # N processes each starting one OpenMP thread per core oversubscribe the node.
            env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // count))
        plans.append(
            WorkerPlan(
                rank=int(env["RANK"]),
                local_rank=local_rank,
                env=env,
                argv=config.program.argv(local_rank),
                cpus=cpus,
            )
        )
    return plans


class _Worker:
    def __init__(
        self, plan: WorkerPlan, popen: subprocess.Popen[bytes], output: RankOutput
    ) -> None:
        self.plan = plan
        self.popen = popen  # the keeper, or the worker itself without keepers
        self.output = output
        self.pid: int | None = None if KEEPERS_AVAILABLE else popen.pid  # the worker's own

    def find_pid(self) -> None:
        if self.pid is None:
            self.pid = worker_pid(self.popen)


class NodeLauncher:
    """Runs and supervises this node's workers; see the module docstring."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.node = config.node
        self.workers: list[_Worker] = []
        self._signal: int | None = None
        self._hurry = False
        self._stdin_closed = threading.Event()
        self._pid_files: list[Path] = []
        self._previous_handlers: dict[int, object] = {}
        self._failed: _Worker | None = None

    # -- signals ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self._signal is None:
            self._signal = signum
        else:
            self._hurry = True

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(sig)
            # Respect `nohup` (SIGHUP ignored) and background jobs (SIGINT ignored).
            if previous == signal.SIG_IGN:
                continue
            self._previous_handlers[sig] = previous
            signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    # -- setup -----------------------------------------------------------------------------
    def _write_pid_files(self) -> None:
        node_rank = self.node.node_rank
        if self.config.save_pid is not None:
            path = self.config.save_pid.replace("{node_rank}", str(node_rank))
            self._pid_files.append(write_pid_file(path))
        if self.config.job_id is not None:
            path = job_pid_file(self.config.job_id, node_rank)
            self._pid_files.append(write_pid_file(path, "job pid file"))

    def _spawn(self, plans: list[WorkerPlan]) -> None:
        tracebacks = TracebackRegistry()
        console_lock = threading.Lock()
        base_env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_RANK_VARS}
        stdin = subprocess.DEVNULL if self.config.watch_stdin else None
        outputs = []
        launcher_pid = os.getpid()

        def preexec(cpus: tuple[int, ...] | None) -> Callable[[], None]:
            return make_preexec(launcher_pid, signal.SIGTERM, cpus)

        # Spawn every worker before any output thread starts: preexec_fn is only safe
        # in a single-threaded parent.
        for plan in plans:
            argv = plan.argv
            if KEEPERS_AVAILABLE:
                argv = keeper_argv(launcher_pid, self.config.kill_timeout, argv)
            env = {**base_env, **plan.env}
            try:
                popen = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    # Safe: no thread of ours is running yet (see the comment above).
                    preexec_fn=preexec(plan.cpus),  # noqa: PLW1509
                )
            except (OSError, ValueError) as exc:
                raise LaunchError(spawn_error(f"rank {plan.rank}", argv, env, exc)) from None
            output = RankOutput(plan.rank, console_lock, self.config.log_dir, tracebacks)
            self.workers.append(_Worker(plan, popen, output))
            outputs.append((output, popen))
        for output, popen in outputs:
            assert popen.stdout is not None and popen.stderr is not None
            output.pump("stdout", popen.stdout, sys.stdout.buffer)
            output.pump("stderr", popen.stderr, sys.stderr.buffer)
        if self.config.watch_stdin:
            threading.Thread(target=self._watch_stdin, name="stdin-watch", daemon=True).start()

    def _watch_stdin(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        self._stdin_closed.set()

    # -- supervision -----------------------------------------------------------------------
    def _supervise(self) -> int:
        node_rank = self.node.node_rank
        while True:
            if self._signal is not None:
                name = signal.Signals(self._signal).name
                _say(f"node {node_rank}: received {name}; stopping {len(self.workers)} worker(s)")
                return 128 + self._signal
            if self._stdin_closed.is_set():
                _say(
                    f"node {node_rank}: the connection to the runner closed "
                    "(stdin end-of-file); stopping the workers"
                )
                return 128 + signal.SIGHUP
            running = 0
            for worker in self.workers:
                worker.find_pid()
                code = worker.popen.poll()
                if code is None:
                    running += 1
                elif code != 0:
                    return self._report_failure(worker, code)
                worker.output.release_held()
            if running == 0:
                return 0
            time.sleep(_POLL_SECONDS)

    def _report_failure(self, worker: _Worker, returncode: int) -> int:
        code = exit_code_for(returncode)
        how = (
            f"was killed by {signal.Signals(-returncode).name}"
            if returncode < 0 and -returncode in signal.valid_signals()
            else f"exited with code {returncode}"
        )
        others = sum(1 for w in self.workers if w is not worker and w.popen.poll() is None)
        _say(
            f"rank {worker.plan.rank} (node {self.node.node_rank} {self.node.host}, local rank "
            f"{worker.plan.local_rank}, pid {worker.pid or worker.popen.pid}) {how}; stopping "
            f"{others} other worker(s); exit code {code}"
        )
        self._failed = worker
        # Its last traceback is printed once, in the report; other ranks' copies of the
        # same traceback now point there instead of repeating it.
        worker.output.claim_held()
        if self.config.job_id is not None:
            print(
                f"{JOB_FAILED_MARKER} {self.config.job_id} node={self.node.node_rank} code={code}",
                flush=True,
            )
        return code

    def run(self) -> int:
        """Run the workers to completion; return the node's exit code."""
        config = self.config
        plans = plan_workers(config)
        self._install_signal_handlers()
        try:
            if config.log_dir is not None:
                _prepare_log_dir(config.log_dir)
            self._write_pid_files()
            set_child_subreaper()
            ranks = self.node.ranks
            _say(
                f"node {self.node.node_rank} ({self.node.host}): starting ranks {ranks.start}-"
                f"{ranks.stop - 1} of world size {self.node.world_size}, master "
                f"{config.master_addr}:{config.master_port}"
            )
            self._spawn(plans)
            code = self._supervise()
        finally:
            self._teardown()
        if self._failed is not None:
            self._failed.output.report(_say, master_port=config.master_port)
        return code

    def _teardown(self) -> None:
        terminate_descendants(
            [w.popen for w in self.workers],
            self.config.kill_timeout,
            hurry=lambda: self._hurry,
            keepers=KEEPERS_AVAILABLE,
        )
        for worker in self.workers:
            worker.output.close(show_held=worker is not self._failed)
        for path in self._pid_files:
            with contextlib.suppress(OSError):
                path.unlink()
        self._restore_signal_handlers()


def _prepare_log_dir(log_dir: str) -> None:
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise LaunchError(
            f"--log_dir {log_dir!r} is a file; pass a directory (it is created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"--log_dir {log_dir!r} cannot be created: {exc.strerror}") from None


def _say(message: str) -> None:
    print(f"funczero launch: {message}", file=sys.stderr, flush=True)


def run_node(config: NodeConfig) -> int:
    """Run this node's workers; return the exit code (see the module docstring)."""
    return NodeLauncher(config).run()
