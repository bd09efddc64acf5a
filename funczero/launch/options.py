"""Launch options as plain data, and the checks that need no resources."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from funczero.launch.errors import LaunchError

__all__ = [
    "DEFAULT_HOSTFILE",
    "DEFAULT_KILL_TIMEOUT",
    "DEFAULT_MASTER_PORT",
    "DEFAULT_MAX_RESTARTS",
    "LAUNCHERS",
    "MAX_CORE_ID",
    "MAX_NODES",
    "MAX_SLOTS_PER_NODE",
    "MPI_LAUNCHERS",
    "LaunchOptions",
    "parse_core_list",
]

DEFAULT_HOSTFILE = "/job/hostfile"
DEFAULT_MASTER_PORT = 29500
DEFAULT_KILL_TIMEOUT = 30.0
DEFAULT_MAX_RESTARTS = 3
#: Upper bounds that keep a typo from allocating the impossible (no real job is near them).
MAX_NODES = 100_000
MAX_SLOTS_PER_NODE = 4096
#: Core ids above this cannot exist (Linux's largest CONFIG_NR_CPUS).
MAX_CORE_ID = 8191
LAUNCHERS = ("local", "ssh", "pdsh", "openmpi", "mpich", "slurm")
#: Runners that start the workers themselves (ranks come from the scheduler's env).
MPI_LAUNCHERS = ("openmpi", "mpich", "slurm")


@dataclass
class LaunchOptions:
    """Everything ``funczero launch`` accepts; ``None`` means "not given".

    See ``docs/launcher.md`` for each flag's meaning.
    """

    script: str | None = None
    script_args: tuple[str, ...] = ()
    hostfile: str | None = None
    include: str = ""
    exclude: str = ""
    num_nodes: int | None = None
    num_gpus: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    node_rank: int | None = None
    launcher: str | None = None
    launcher_args: str = ""
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    env_file: str | None = None
    log_dir: str | None = None
    save_pid: str | None = None
    bind_cores_to_rank: bool = False
    bind_core_list: str | None = None
    elastic: bool = False
    min_nodes: int | None = None
    max_nodes: int | None = None
    max_restarts: int | None = None
    run_id: str | None = None
    kill_timeout: float = DEFAULT_KILL_TIMEOUT
    dry_run: bool = False

    def validate(self) -> None:
        """Reject conflicting or out-of-range flags.

        Raises:
            LaunchError: Naming the first problem found and how to fix it.
        """
        self._validate_program()
        self._validate_numbers()
        self._validate_launcher()
        self._validate_elastic()

    def _validate_program(self) -> None:
        if not self.script:
            raise LaunchError(
                "missing SCRIPT; usage: funczero launch [OPTIONS] SCRIPT [SCRIPT_ARGS]..."
            )
        if self.script.startswith("-"):
            raise LaunchError(
                f"unknown launcher option {self.script!r}; see 'funczero launch --help' "
                "(script arguments go after SCRIPT)"
            )
        if self.module and self.no_python:
            raise LaunchError(
                "--module and --no_python cannot be combined: --module runs 'python -m "
                "SCRIPT', --no_python runs SCRIPT as an executable; pick one"
            )
        if self.include and self.exclude:
            raise LaunchError(
                "--include and --exclude cannot be combined; express the selection with one of them"
            )
        if (self.include or self.exclude) and (
            self.num_nodes is not None or self.num_gpus is not None
        ):
            flag = "--include" if self.include else "--exclude"
            raise LaunchError(
                f"{flag} cannot be combined with --num_nodes/--num_gpus; select resources "
                "with one mechanism"
            )
        if self.bind_core_list is not None and not self.bind_cores_to_rank:
            raise LaunchError(
                "--bind_core_list needs --bind_cores_to_rank; add it or drop the list"
            )

    def _validate_numbers(self) -> None:
        for flag, value, most in (
            ("--num_nodes", self.num_nodes, MAX_NODES),
            ("--num_gpus", self.num_gpus, MAX_SLOTS_PER_NODE),
            ("--min_nodes", self.min_nodes, MAX_NODES),
            ("--max_nodes", self.max_nodes, MAX_NODES),
        ):
            if value is not None and not 1 <= value <= most:
                raise LaunchError(f"{flag} {value} is out of range; use 1-{most}")
        if self.master_port is not None and not 0 <= self.master_port <= 65535:
            raise LaunchError(
                f"--master_port {self.master_port} is out of range; use 1-65535, or 0 to "
                "pick a free port on a single node"
            )
        if self.node_rank is not None and not 0 <= self.node_rank < MAX_NODES:
            raise LaunchError(
                f"--node_rank {self.node_rank} is out of range; use 0-{MAX_NODES - 1}"
            )
        if not (math.isfinite(self.kill_timeout) and 0 <= self.kill_timeout <= 86400):
            raise LaunchError(
                f"--kill_timeout {self.kill_timeout} is not a number of seconds in 0-86400; "
                "pass e.g. 30"
            )

    def _validate_launcher(self) -> None:
        launcher = self.launcher
        if launcher is not None and launcher not in LAUNCHERS:
            raise LaunchError(
                f"--launcher {launcher!r} is not supported; choose one of {', '.join(LAUNCHERS)}"
            )
        if self.node_rank is not None and launcher not in (None, "local"):
            raise LaunchError(
                f"--node_rank starts this node by hand and cannot be combined with "
                f"--launcher {launcher}; drop one of them"
            )
        if self.launcher_args and (launcher in (None, "local") or self.node_rank is not None):
            raise LaunchError(
                "--launcher_args only applies to --launcher ssh/pdsh/openmpi/mpich/slurm; "
                "drop it or choose a launcher"
            )
        if launcher in MPI_LAUNCHERS:
            for flag, given in (
                ("--log_dir", self.log_dir is not None),
                ("--save_pid", self.save_pid is not None),
                ("--bind_cores_to_rank", self.bind_cores_to_rank),
            ):
                if given:
                    raise LaunchError(
                        f"{flag} is not supported with --launcher {launcher} ({launcher} starts "
                        "the workers itself); pass the equivalent option through --launcher_args"
                    )

    def _validate_elastic(self) -> None:
        if not self.elastic:
            for flag, value in (
                ("--min_nodes", self.min_nodes),
                ("--max_nodes", self.max_nodes),
                ("--max_restarts", self.max_restarts),
                ("--run_id", self.run_id),
            ):
                if value is not None:
                    raise LaunchError(
                        f"{flag} only applies with --elastic; add --elastic or drop it"
                    )
            return
        if self.node_rank is not None:
            raise LaunchError(
                "--node_rank cannot be combined with --elastic: the rendezvous assigns node "
                "ranks; start every node with the same command instead"
            )
        if self.launcher in MPI_LAUNCHERS:
            raise LaunchError(
                f"--elastic is not supported with --launcher {self.launcher}; use local, ssh "
                "or pdsh"
            )
        if self.bind_cores_to_rank:
            raise LaunchError(
                "--bind_cores_to_rank is not supported with --elastic; drop one of them"
            )
        if (
            self.min_nodes is not None
            and self.max_nodes is not None
            and self.min_nodes > self.max_nodes
        ):
            raise LaunchError(
                f"--min_nodes {self.min_nodes} is larger than --max_nodes {self.max_nodes}"
            )
        if self.max_restarts is not None and not 0 <= self.max_restarts <= 1_000_000:
            raise LaunchError(f"--max_restarts {self.max_restarts} is out of range; use 0-1000000")


def parse_core_list(text: str) -> list[int]:
    """Parse ``--bind_core_list`` such as ``"0-3,8,10-11"``.

    Example:
        >>> parse_core_list("0-3,8,10-11")
        [0, 1, 2, 3, 8, 10, 11]

    Raises:
        LaunchError: On malformed items, descending ranges, repeated cores or core ids
            beyond any machine's.
    """
    cores: list[int] = []
    for item in text.split(","):
        item = item.strip()
        low, sep, high = item.partition("-")
        if not (low.isascii() and low.isdigit()) or (
            sep and not (high.isascii() and high.isdigit())
        ):
            raise LaunchError(
                f"--bind_core_list {text!r}: {item!r} is not a core id or range; use e.g. '0-3,8'"
            )
        first, last = int(low), int(high) if sep else int(low)
        if last > MAX_CORE_ID:
            raise LaunchError(
                f"--bind_core_list {text!r}: core {last} does not exist (core ids are at most "
                f"{MAX_CORE_ID}); list this machine's cores, e.g. '0-{(os.cpu_count() or 1) - 1}'"
            )
        if last < first:
            raise LaunchError(f"--bind_core_list {text!r}: range {item!r} is descending")
        cores.extend(range(first, last + 1))
    if len(set(cores)) != len(cores):
        raise LaunchError(f"--bind_core_list {text!r} lists a core more than once")
    return cores
