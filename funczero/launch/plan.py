"""Resolve options into a :class:`Plan`: world, runner, master address, program."""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from funczero.launch.elastic import ElasticConfig, default_run_id
from funczero.launch.envfile import exported_environment, load_env_files
from funczero.launch.errors import LaunchError
from funczero.launch.node import NodeConfig
from funczero.launch.options import (
    DEFAULT_MASTER_PORT,
    DEFAULT_MAX_RESTARTS,
    LaunchOptions,
    parse_core_list,
)
from funczero.launch.resources import resolve_world
from funczero.launch.spec import Program, World

__all__ = ["Plan", "check_port_free", "free_port", "make_plan"]

REMOTE_SHELL_LAUNCHERS = ("ssh", "pdsh")


@dataclass(frozen=True)
class Plan:
    """A fully resolved launch.

    Attributes:
        opts: The options it came from.
        world: Nodes and slots, in rank order.
        hostfile: The hostfile used, or None for this machine.
        launcher: ``local``, ``ssh``, ``pdsh``, ``openmpi``, ``mpich`` or ``slurm``.
        program: The user's command.
        master_addr: Address of the rank-0 host.
        master_port: Rendezvous port.
        exports: Variables exported to every node (NCCL*, PYTHON*, UCX*, env file).
        env_file_vars: The env file's variables alone (set for local workers, which
            inherit everything else).
        job_id: Unique id of this launch (PID files, failure markers).
        cwd: Working directory the workers start in on every node.
    """

    opts: LaunchOptions
    world: World
    hostfile: Path | None
    launcher: str
    program: Program
    master_addr: str
    master_port: int
    exports: dict[str, str]
    env_file_vars: dict[str, str]
    job_id: str
    cwd: str

    @property
    def local_node_rank(self) -> int:
        """The node this process runs when ``launcher == "local"``."""
        return self.opts.node_rank or 0

    @property
    def elastic_nodes(self) -> tuple[int, int]:
        """``(min_nodes, max_nodes)`` for the rendezvous."""
        count = len(self.world.nodes) if self.launcher in REMOTE_SHELL_LAUNCHERS else 1
        max_nodes = self.opts.max_nodes or max(count, self.opts.min_nodes or count)
        min_nodes = self.opts.min_nodes or min(count, max_nodes)
        return min_nodes, max_nodes

    @property
    def run_id(self) -> str:
        """Elastic rendezvous id."""
        return self.opts.run_id or default_run_id(self.master_addr, self.master_port)

    def node_config(self, node_rank: int, *, watch_stdin: bool = False) -> NodeConfig:
        """Configuration of the per-node launcher for ``node_rank``."""
        core_list = self.opts.bind_core_list
        return NodeConfig(
            node=self.world.assignment(node_rank),
            master_addr=self.master_addr,
            master_port=self.master_port,
            program=self.program,
            extra_env=self.env_file_vars,
            log_dir=self.opts.log_dir,
            save_pid=self.opts.save_pid,
            bind_cores=self.opts.bind_cores_to_rank,
            core_list=tuple(parse_core_list(core_list)) if core_list else None,
            kill_timeout=self.opts.kill_timeout,
            watch_stdin=watch_stdin,
        )

    def elastic_config(self, node_rank: int) -> ElasticConfig:
        """Configuration of the elastic agent on ``node_rank``."""
        node = self.world.nodes[node_rank]
        min_nodes, max_nodes = self.elastic_nodes
        return ElasticConfig(
            program=self.program,
            nproc=len(node.slots),
            min_nodes=min_nodes,
            max_nodes=max_nodes,
            max_restarts=(
                self.opts.max_restarts
                if self.opts.max_restarts is not None
                else DEFAULT_MAX_RESTARTS
            ),
            master_addr=self.master_addr,
            master_port=self.master_port,
            run_id=self.run_id,
            log_dir=self.opts.log_dir,
            kill_timeout=self.opts.kill_timeout,
            extra_env=self.env_file_vars,
            visible_devices=node.visible_devices() if self.world.accelerator == "cuda" else None,
            save_pid=self.opts.save_pid,
        )


def free_port() -> int:
    """Return a TCP port that is free on this machine right now.

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def check_port_free(addr: str, port: int) -> None:
    """Fail early, with a hint, when ``port`` is taken on this machine at ``addr``.

    Only an IP address (or ``localhost``) is checked, and only if this machine has
    it; host names are not resolved here (a slow DNS must not delay every launch).

    Raises:
        LaunchError: If the port is in use.
    """
    bare = addr.strip("[]")
    if bare == "localhost":
        bare = "127.0.0.1"
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(bare).version == 6 else socket.AF_INET
    except ValueError:
        return  # a host name
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option as the rendezvous store: a port in TIME_WAIT is reusable there too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bare, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # not an address of this machine, or not resolvable here
            raise LaunchError(
                f"--master_port {port} is in use on this machine ({addr}:{port}; another job "
                "or a previous run still exiting?); pass a free port, or leave --master_port "
                "out on a single node to get one"
            ) from None


def _standalone(opts: LaunchOptions, world: World, launcher: str) -> bool:
    """One node, nobody else joining: the rendezvous port can be any free port."""
    if launcher != "local" or len(world.nodes) != 1 or opts.node_rank is not None:
        return False
    if opts.master_addr is not None:
        return False  # other launchers may rendezvous at this address
    return not (opts.elastic and (opts.max_nodes or 1) > 1)


def _master_port(opts: LaunchOptions, world: World, launcher: str, master_addr: str) -> int:
    standalone = _standalone(opts, world, launcher)
    if opts.master_port == 0 or (opts.master_port is None and standalone):
        if not standalone:
            raise LaunchError(
                "--master_port 0 picks a free port on this machine, which only works for "
                "a single-node local run; pass a fixed port such as 29500"
            )
        return free_port()
    port = DEFAULT_MASTER_PORT if opts.master_port is None else opts.master_port
    hosts_rank0 = launcher == "local" and (opts.node_rank or 0) == 0
    if hosts_rank0 and not opts.elastic:
        # rank 0's store listens here; elastic agents share the port among themselves.
        check_port_free(master_addr, port)
    return port


def _choose_launcher(opts: LaunchOptions, world: World) -> str:
    if opts.node_rank is not None:
        return "local"
    nodes = len(world.nodes)
    if opts.launcher is None:
        # ssh, not pdsh, by default: each node's launcher watches its ssh connection,
        # so losing the runner (even to SIGKILL) stops every node.
        return "local" if nodes == 1 else "ssh"
    if opts.launcher == "local" and nodes > 1:
        raise LaunchError(
            f"--launcher local runs one node but {nodes} hosts are selected "
            f"({', '.join(world.hosts)}); use --launcher ssh/pdsh, select one host "
            "(--include/--num_nodes 1), or start each node with --node_rank"
        )
    return opts.launcher


def _slurm_first_node(environ: Mapping[str, str]) -> str:
    nodelist = environ.get("SLURM_JOB_NODELIST")
    if nodelist and shutil.which("scontrol"):
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    raise LaunchError(
        "--launcher slurm without a hostfile needs --master_addr (the first node of the "
        "allocation), or run inside an allocation with scontrol on PATH"
    )


def _master_addr(
    opts: LaunchOptions,
    world: World,
    launcher: str,
    hostfile: Path | None,
    environ: Mapping[str, str],
) -> str:
    if opts.master_addr:
        return opts.master_addr
    if launcher == "local" and (len(world.nodes) == 1 or opts.elastic):
        return "127.0.0.1"
    if launcher == "local" and hostfile is None:
        raise LaunchError(
            f"--node_rank with --num_nodes {len(world.nodes)} and no hostfile needs "
            "--master_addr (the address of node 0, reachable from every node)"
        )
    if launcher == "slurm" and hostfile is None:
        return _slurm_first_node(environ)
    return world.nodes[0].host


def _check_program(opts: LaunchOptions, launcher: str) -> None:
    """Catch a missing script before starting anything (local runs only)."""
    assert opts.script is not None
    if launcher != "local" or opts.module:
        return  # remote file systems and module paths are only known on the nodes
    if opts.no_python:
        if shutil.which(opts.script) is None:
            raise LaunchError(
                f"--no_python: {opts.script!r} is not an executable file or a command on PATH"
            )
    elif not Path(opts.script).is_file():
        raise LaunchError(
            f"script {opts.script!r} not found (working directory {os.getcwd()}); pass a "
            "path to a Python file, or --module for a module name"
        )


def make_plan(
    opts: LaunchOptions,
    *,
    environ: Mapping[str, str] | None = None,
    local_gpus: int | None = None,
) -> Plan:
    """Validate ``opts`` and resolve everything needed to launch.

    Args:
        opts: Parsed command-line options.
        environ: Launcher environment; ``os.environ`` by default.
        local_gpus: GPU count of this machine; detected when None.

    Raises:
        LaunchError: On any misuse, with a one-line explanation.
    """
    environ = os.environ if environ is None else environ
    opts.validate()
    env_file_vars = load_env_files(opts.env_file)
    exports = exported_environment(environ, env_file_vars)
    world, hostfile = resolve_world(opts, environ=environ, local_gpus=local_gpus)
    launcher = _choose_launcher(opts, world)
    if opts.node_rank is not None and opts.node_rank >= len(world.nodes):
        raise LaunchError(
            f"--node_rank {opts.node_rank} is out of range: the job has {len(world.nodes)} "
            f"node(s) ({', '.join(world.hosts)}), so node ranks are 0-{len(world.nodes) - 1}"
        )
    _check_program(opts, launcher)
    master_addr = _master_addr(opts, world, launcher, hostfile, environ)
    master_port = _master_port(opts, world, launcher, master_addr)
    if opts.bind_core_list:
        parse_core_list(opts.bind_core_list)  # report a bad list before starting anything
    assert opts.script is not None
    program = Program(
        script=opts.script,
        args=tuple(opts.script_args),
        module=opts.module,
        no_python=opts.no_python,
        no_local_rank=opts.no_local_rank,
    )
    return Plan(
        opts=opts,
        world=world,
        hostfile=hostfile,
        launcher=launcher,
        program=program,
        master_addr=master_addr,
        master_port=master_port,
        exports=exports,
        env_file_vars=env_file_vars,
        job_id=uuid.uuid4().hex[:12],
        cwd=os.getcwd(),
    )
