"""Elastic mode: run this node's workers under torch.distributed.elastic.

Nothing is re-implemented: the agent, the c10d rendezvous (on
``master_addr:master_port``), gang restarts and ``max_restarts`` are torch's
(``torch.distributed.launcher.api.elastic_launch``). funczero adds:

* a keeper for every worker (:mod:`.keeper`): it gets a parent-death signal, which
  torchrun lacks, and holds the worker's whole tree as a child subreaper, so a
  SIGKILLed agent orphans neither the workers nor anything they started;
* ``--local_rank=${local_rank}`` (torch substitutes the macro per worker);
* short failure reports and shell-style exit codes.

torch is imported lazily: the launcher CLI must stay fast to import.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from funczero.launch.errors import exit_code_for
from funczero.launch.procs import (
    KEEPERS_AVAILABLE,
    keeper_argv,
    set_child_subreaper,
    write_pid_file,
)
from funczero.launch.spec import SCHEDULER_RANK_VARS, Program

__all__ = [
    "LOCAL_RANK_MACRO",
    "ElasticConfig",
    "default_run_id",
    "elastic_entrypoint",
    "run_elastic",
]

#: Extra seconds torch's agent waits, beyond the kill timeout, before it SIGKILLs a
#: keeper: the keeper's own escalation (at the kill timeout) must come first, or the
#: SIGKILL would orphan the worker's tree.
_SHUTDOWN_MARGIN = 2
#: The macro torch.distributed.elastic replaces with each worker's local rank.
LOCAL_RANK_MACRO = "${local_rank}"


def default_run_id(master_addr: str, master_port: int) -> str:
    """Rendezvous id shared by all nodes that start with the same master address."""
    return f"funczero-{master_addr}-{master_port}"


@dataclass(frozen=True)
class ElasticConfig:
    """One node's elastic agent.

    Attributes:
        program: The user's command.
        nproc: Workers on this node.
        min_nodes: Smallest node count the rendezvous accepts.
        max_nodes: Largest node count the rendezvous accepts.
        max_restarts: Group restarts after a worker failure before giving up.
        master_addr: Host of the c10d rendezvous store (rank 0's host).
        master_port: Port of the rendezvous store.
        run_id: Rendezvous id; identical on every node of one job.
        log_dir: Base directory for torch's per-attempt logs, or None (a temp dir).
        kill_timeout: Seconds between SIGTERM and SIGKILL when stopping workers.
        extra_env: Variables set for every worker (env file).
        visible_devices: ``CUDA_VISIBLE_DEVICES`` for this node's workers, or None.
        save_pid: File to write the agent's PID to (``{node_rank}`` is not known in
            elastic mode and stays as written), or None.
    """

    program: Program
    nproc: int
    min_nodes: int
    max_nodes: int
    max_restarts: int
    master_addr: str
    master_port: int
    run_id: str
    log_dir: str | None = None
    kill_timeout: float = 30.0
    extra_env: Mapping[str, str] = field(default_factory=dict)
    visible_devices: str | None = None
    save_pid: str | None = None


def elastic_entrypoint(
    program: Program, agent_pid: int, kill_timeout: float = 30.0
) -> tuple[str, list[str]]:
    """Return ``(executable, args)`` for torch's agent: the user command under a keeper."""
    argv = program.argv(LOCAL_RANK_MACRO)
    if not KEEPERS_AVAILABLE:
        return argv[0], argv[1:]
    executable, *args = keeper_argv(agent_pid, kill_timeout, argv)
    return executable, args


class _OnePrefix:
    """Console stream for torch's log tailer: ``[rankN]: [rankN]: `` becomes ``[rankN]: ``.

    torch prefixes each worker line, and its own excepthook in the worker already
    prefixed traceback lines the same way.
    """

    _DOUBLE = re.compile(r"^(\[rank\d+\]: )\1", re.MULTILINE)

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(self._DOUBLE.sub(r"\1", text))

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _single_prefixes() -> Iterator[None]:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _OnePrefix(sys.stdout), _OnePrefix(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _say(message: str) -> None:
    print(f"funczero launch: {message}", file=sys.stderr, flush=True)


def run_elastic(config: ElasticConfig) -> int:
    """Run the elastic agent for this node until the job ends.

    Returns:
        0 on success; the first failing worker's exit code (``128 + N`` for signal
        ``N``) once restarts are used up; ``128 + N`` when the agent got signal ``N``;
        1 when the rendezvous fails.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent's INFO banner and per-attempt chatter drown the workers' output.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    for name in SCHEDULER_RANK_VARS:
        os.environ.pop(name, None)
    os.environ.update(config.extra_env)
    if config.visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = config.visible_devices
    if config.nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // config.nproc))
    if config.log_dir is not None:
        Path(config.log_dir).mkdir(parents=True, exist_ok=True)
    launch_config = LaunchConfig(
        min_nodes=config.min_nodes,
        max_nodes=config.max_nodes,
        nproc_per_node=config.nproc,
        run_id=config.run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=f"{config.master_addr}:{config.master_port}",
        max_restarts=config.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        # Tee both streams: files under log_dir (a temp dir when None) and the
        # console, with the same "[rankN]:" prefix as non-elastic runs.
        logs_specs=DefaultLogsSpecs(log_dir=config.log_dir, tee=Std.ALL),
        log_line_prefix_template="[rank${rank}]: ",
        shutdown_timeout=math.ceil(config.kill_timeout) + _SHUTDOWN_MARGIN,
    )
    entrypoint, args = elastic_entrypoint(config.program, os.getpid(), config.kill_timeout)
    _say(
        f"elastic agent: {config.nproc} worker(s), nodes {config.min_nodes}-{config.max_nodes}, "
        f"max_restarts {config.max_restarts}, rendezvous c10d at "
        f"{config.master_addr}:{config.master_port} id {config.run_id}"
    )
    pid_file = write_pid_file(config.save_pid) if config.save_pid is not None else None
    set_child_subreaper()  # a keeper killed by torch leaves its orphans with us, not init
    try:
        with _single_prefixes():
            elastic_launch(launch_config, entrypoint)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = exit_code_for(failure.exitcode) or 1
        _say(
            f"rank {rank} (pid {failure.pid}) failed with exit code {code}; no restarts "
            f"left (max_restarts {config.max_restarts}); see its output above"
        )
        return code
    except SignalException as exc:
        _say(f"received {exc.sigval.name}; workers stopped")
        return 128 + int(exc.sigval)
    except RendezvousError as exc:
        _say(f"rendezvous at {config.master_addr}:{config.master_port} failed: {exc}")
        return 1
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    return 0
