"""Command lines of the multi-node runners: ssh, pdsh, openmpi, mpich, slurm.

ssh and pdsh start the per-node launcher (``python -m funczero.launch.agent``) on
every host. Its command is one shell string in which every token, the exported
variables included, is quoted with :func:`shlex.quote`, so arguments with spaces,
quotes, ``$`` or ``%`` reach the script unchanged. openmpi, mpich and slurm start
the workers themselves; the workers read their rank from ``OMPI_COMM_WORLD_*``,
``PMI_*`` or ``SLURM_*``, and ``MASTER_ADDR`` / ``MASTER_PORT`` are exported.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass, field

from funczero.launch.errors import LaunchError
from funczero.launch.plan import Plan

__all__ = [
    "AGENT_MODULE",
    "Command",
    "agent_argv",
    "mpi_command",
    "pdsh_command",
    "pdsh_stop_command",
    "remote_shell_command",
    "ssh_commands",
]

AGENT_MODULE = "funczero.launch.agent"
_HOST_PLACEHOLDER = "FUNCZERO_NODE_HOST_PLACEHOLDER"
_PDSH_FANOUT = "1024"


@dataclass(frozen=True)
class Command:
    """A process the runner starts.

    Attributes:
        label: What it is, for messages (``"node 1 (worker-2)"``).
        argv: The command line.
        env: Variables set for this process on top of the launcher's environment.
    """

    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """Return a copy-pasteable shell line (``env K=V ... argv``)."""
        prefix = ["env", *(f"{k}={v}" for k, v in self.env.items())] if self.env else []
        return shlex.join(prefix + self.argv)


def agent_argv(
    plan: Plan,
    *,
    node_rank: int | None = None,
    node_host: str | None = None,
    watch_stdin: bool = False,
    job_id: str | None = None,
) -> list[str]:
    """Command line of the per-node launcher on a remote node."""
    opts = plan.opts
    argv = [
        sys.executable, "-u", "-m", AGENT_MODULE,
        "--world_info", plan.world.encode(),
        "--master_addr", plan.master_addr,
        "--master_port", str(plan.master_port),
        "--kill_timeout", str(opts.kill_timeout),
    ]  # fmt: skip
    if node_rank is not None:
        argv += ["--node_rank", str(node_rank)]
    if node_host is not None:
        argv += ["--node_host", node_host]
    for flag, value in (
        ("--log_dir", opts.log_dir),
        ("--save_pid", opts.save_pid),
        ("--bind_core_list", opts.bind_core_list),
        ("--job_id", job_id),
    ):
        if value is not None:
            argv += [flag, value]
    for flag, enabled in (
        ("--bind_cores_to_rank", opts.bind_cores_to_rank),
        ("--module", opts.module),
        ("--no_python", opts.no_python),
        ("--no_local_rank", opts.no_local_rank),
        ("--watch_stdin", watch_stdin),
    ):
        if enabled:
            argv.append(flag)
    if opts.elastic:
        min_nodes, max_nodes = plan.elastic_nodes
        config = plan.elastic_config(0)
        argv += [
            "--elastic",
            "--min_nodes", str(min_nodes),
            "--max_nodes", str(max_nodes),
            "--max_restarts", str(config.max_restarts),
            "--run_id", plan.run_id,
        ]  # fmt: skip
    return [*argv, "--", plan.program.script, *plan.program.args]


def remote_shell_command(plan: Plan, argv: list[str]) -> str:
    """Return ``cd CWD && exec env K=V ... ARGV`` with every token shell-quoted."""
    assignments = [f"{k}={v}" for k, v in plan.exports.items()]
    run = ["env", *assignments, *argv] if assignments else argv
    return f"cd {shlex.quote(plan.cwd)} && exec {shlex.join(run)}"


def _launcher_args(plan: Plan) -> list[str]:
    try:
        return shlex.split(plan.opts.launcher_args)
    except ValueError as exc:
        raise LaunchError(
            f"--launcher_args {plan.opts.launcher_args!r} cannot be split: {exc}; check the quotes"
        ) from None


def ssh_commands(plan: Plan) -> list[Command]:
    """One ``ssh HOST 'cd ... && exec ... agent --node_rank i'`` per node.

    The agent watches stdin: when the ssh connection closes (the runner stopped or
    died) it stops its workers.
    """
    extra = _launcher_args(plan)
    commands = []
    for rank, node in enumerate(plan.world.nodes):
        remote = remote_shell_command(plan, agent_argv(plan, node_rank=rank, watch_stdin=True))
        argv = ["ssh", "-o", "BatchMode=yes", *extra, node.host, remote]
        commands.append(Command(f"node {rank} ({node.host})", argv))
    return commands


def _pdsh_base(plan: Plan) -> tuple[list[str], dict[str, str]]:
    # Respect a user's PDSH_RCMD_TYPE (DeepSpeed overwrote it, #4370).
    env = {} if "PDSH_RCMD_TYPE" in os.environ else {"PDSH_RCMD_TYPE": "ssh"}
    hosts = ",".join(plan.world.hosts)
    return ["pdsh", "-S", "-f", _PDSH_FANOUT, "-w", hosts, *_launcher_args(plan)], env


def pdsh_command(plan: Plan) -> Command:
    """One ``pdsh -S -w HOSTS '...agent --node_host %h'`` for all nodes.

    pdsh expands ``%h``/``%n``/``%u`` in the command, so every ``%`` of ours is
    doubled; each node finds its rank by looking its ``%h`` name up in the world.
    """
    base, env = _pdsh_base(plan)
    argv = agent_argv(plan, node_host=_HOST_PLACEHOLDER, job_id=plan.job_id)
    remote = remote_shell_command(plan, argv).replace("%", "%%")
    remote = remote.replace(_HOST_PLACEHOLDER, "%h")
    return Command(f"pdsh ({len(plan.world.nodes)} nodes)", [*base, remote], env)


def pdsh_stop_command(plan: Plan) -> Command:
    """``pdsh`` command that sends SIGTERM to this job's agents on every node."""
    base, env = _pdsh_base(plan)
    pid_glob = f"/tmp/funczero-{plan.job_id}-node*.pid"
    script = f'for f in {pid_glob}; do kill -TERM "$(cat "$f")"; done 2>/dev/null; true'
    return Command("pdsh stop", [*base, script], env)


def _ranks_per_node(plan: Plan, launcher: str, ragged_ok: bool) -> list[int]:
    nodes = plan.world.nodes
    longest = max(nodes, key=lambda n: len(n.slots))
    for node in nodes:
        same = (
            node.slots == longest.slots[: len(node.slots)]
            if ragged_ok
            else node.slots == longest.slots
        )
        if not same:
            raise LaunchError(
                f"--launcher {launcher} gives every host the same device list, but host "
                f"{node.host!r} uses slots {','.join(map(str, node.slots))} and "
                f"{longest.host!r} uses {','.join(map(str, longest.slots))}; select the same "
                "slots on every host or use --launcher ssh/pdsh"
            )
    return [len(n.slots) for n in nodes]


def mpi_command(plan: Plan) -> Command:
    """The ``mpirun`` (openmpi, mpich) or ``srun`` (slurm) command for the whole job."""
    launcher = plan.launcher
    counts = _ranks_per_node(plan, launcher, ragged_ok=launcher == "openmpi")
    world_size, hosts = sum(counts), plan.world.hosts
    env = dict(plan.exports)
    env.update(MASTER_ADDR=plan.master_addr, MASTER_PORT=str(plan.master_port))
    if plan.world.accelerator == "cuda" and launcher != "slurm":
        # Slurm's GRES sets CUDA_VISIBLE_DEVICES per task; MPI needs it from us.
        env["CUDA_VISIBLE_DEVICES"] = max(
            plan.world.nodes, key=lambda n: len(n.slots)
        ).visible_devices()
    # One command for all ranks, so no per-rank --local_rank: workers read it from env.
    program = dataclasses.replace(plan.program, no_local_rank=True).argv(0)
    extra = _launcher_args(plan)
    if launcher == "openmpi":
        host_list = ",".join(f"{h}:{c}" for h, c in zip(hosts, counts, strict=True))
        exports = [item for k, v in env.items() for item in ("-x", f"{k}={v}")]
        argv = ["mpirun", "-n", str(world_size), "--host", host_list, *extra, *exports, *program]
        return Command("mpirun (openmpi)", argv)
    if launcher == "mpich":
        exports = [item for k, v in env.items() for item in ("-genv", k, v)]
        argv = [
            "mpirun", "-n", str(world_size), "-ppn", str(counts[0]), "-hosts", ",".join(hosts),
            *extra, *exports, *program,
        ]  # fmt: skip
        return Command("mpirun (mpich)", argv)
    argv = [
        "srun",
        f"--nodes={len(counts)}",
        f"--ntasks={world_size}",
        f"--ntasks-per-node={counts[0]}",
    ]
    if plan.hostfile is not None:
        argv.append(f"--nodelist={','.join(hosts)}")
    # srun's --export=K=V cannot carry commas in values; pass them in srun's own
    # environment instead, which --export=ALL forwards verbatim.
    argv += ["--export=ALL", *extra, *program]
    return Command("srun (slurm)", argv, env)
