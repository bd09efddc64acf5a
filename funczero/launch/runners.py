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
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

from funczero.launch.errors import LaunchError
from funczero.launch.plan import Plan
from funczero.launch.procs import ARG_STRLEN_MAX
from funczero.launch.spec import encode_node_table

__all__ = [
    "AGENT_MODULE",
    "Command",
    "agent_argv",
    "mpi_command",
    "pdsh_commands",
    "pdsh_stop_commands",
    "remote_shell_command",
    "ssh_commands",
]

AGENT_MODULE = "funczero.launch.agent"
_HOST_PLACEHOLDER = "FUNCZERO_NODE_HOST_PLACEHOLDER"
_PDSH_FANOUT = "1024"
#: Budget for one remote command (ssh's command argument, pdsh's, and the remote
#: shell's ``-c`` argument): Linux's per-argument limit with room to spare.
_REMOTE_COMMAND_MAX = 96 * 1024


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
    nodes: str,
    *,
    node_host: str | None = None,
    watch_stdin: bool = False,
    job_id: str | None = None,
) -> list[str]:
    """Command line of the per-node launcher on a remote node.

    Args:
        plan: The launch.
        nodes: Node table (:func:`~funczero.launch.spec.encode_node_table`) holding
            this node's assignment.
        node_host: The host to look up in ``nodes`` (pdsh's ``%h``); None when the
            table holds one node.
        watch_stdin: Stop the node when stdin closes (ssh).
        job_id: Job id for the pdsh PID file and failure marker.
    """
    head, tail = _agent_parts(plan, watch_stdin=watch_stdin, job_id=job_id)
    host = [f"--node_host={node_host}"] if node_host is not None else []
    return [*head, f"--nodes={nodes}", *host, *tail]


def _agent_parts(
    plan: Plan, *, watch_stdin: bool, job_id: str | None
) -> tuple[list[str], list[str]]:
    """The agent's command line before and after the per-node ``--nodes``/``--node_host``."""
    opts = plan.opts
    # "--flag=value": argparse would take a value starting with "-" for an option.
    head = [
        sys.executable, "-u", "-m", AGENT_MODULE,
        f"--master_addr={plan.master_addr}",
        f"--master_port={plan.master_port}",
        f"--kill_timeout={opts.kill_timeout}",
    ]  # fmt: skip
    tail = []
    for flag, value in (
        ("--log_dir", opts.log_dir),
        ("--save_pid", opts.save_pid),
        ("--bind_core_list", opts.bind_core_list),
        ("--job_id", job_id),
    ):
        if value is not None:
            tail.append(f"{flag}={value}")
    for flag, enabled in (
        ("--bind_cores_to_rank", opts.bind_cores_to_rank),
        ("--module", opts.module),
        ("--no_python", opts.no_python),
        ("--no_local_rank", opts.no_local_rank),
        ("--watch_stdin", watch_stdin),
    ):
        if enabled:
            tail.append(flag)
    if opts.elastic:
        min_nodes, max_nodes = plan.elastic_nodes
        tail += [
            "--elastic",
            f"--min_nodes={min_nodes}",
            f"--max_nodes={max_nodes}",
            f"--max_restarts={plan.elastic_config(0).max_restarts}",
            f"--run_id={plan.run_id}",
        ]
    return head, [*tail, "--", plan.program.script, *plan.program.args]


def remote_shell_command(plan: Plan, argv: list[str]) -> str:
    """Return ``cd CWD && exec env K=V ... ARGV`` with every token shell-quoted."""
    return f"{_remote_prefix(plan)} {shlex.join(argv)}"


def _remote_prefix(plan: Plan) -> str:
    assignments = [f"{k}={v}" for k, v in plan.exports.items()]
    run = shlex.join(["env", *assignments]) if assignments else ""
    return f"cd {shlex.quote(plan.cwd)} && exec {run}".rstrip()


def _launcher_args(plan: Plan) -> list[str]:
    try:
        return shlex.split(plan.opts.launcher_args)
    except ValueError as exc:
        raise LaunchError(
            f"--launcher_args {plan.opts.launcher_args!r} cannot be split: {exc}; check the quotes"
        ) from None


def _too_big(plan: Plan, what: str, size: int) -> LaunchError:
    exports = sorted(plan.exports.items(), key=lambda kv: len(kv[0]) + len(kv[1]))
    largest = f"; the largest exported variable is {exports[-1][0]}" if exports else ""
    return LaunchError(
        f"{what} is {size:,} bytes, over the {_REMOTE_COMMAND_MAX:,}-byte budget of one remote "
        f"command (Linux takes at most {ARG_STRLEN_MAX:,} bytes in one argument); the "
        f"{len(plan.exports)} exported variable(s) take "
        f"{sum(len(k) + len(v) + 1 for k, v in plan.exports.items()):,} bytes{largest}. "
        "Export less (env file, NCCL*/PYTHON*/UCX* variables) or pass large data in a file"
    )


def ssh_commands(plan: Plan) -> list[Command]:
    """One ``ssh HOST 'cd ... && exec ... agent --nodes THIS_NODE'`` per node.

    Each node's command carries only that node's assignment, so building them is
    linear in the number of nodes and each stays small. The agent watches stdin:
    when the ssh connection closes (the runner stopped or died) it stops its workers.
    """
    extra = _launcher_args(plan)
    head, tail = _agent_parts(plan, watch_stdin=True, job_id=None)
    prefix = f"{_remote_prefix(plan)} {shlex.join(head)}"
    suffix = shlex.join(tail)
    commands = []
    for rank, node in enumerate(plan.world.nodes):
        table = encode_node_table([plan.world.assignment(rank)])
        remote = f"{prefix} {shlex.quote('--nodes=' + table)} {suffix}"
        if len(remote.encode()) > _REMOTE_COMMAND_MAX:
            raise _too_big(plan, f"the ssh command of node {rank} ({node.host})", len(remote))
        argv = ["ssh", "-o", "BatchMode=yes", *extra, node.host, remote]
        commands.append(Command(f"node {rank} ({node.host})", argv))
    return commands


def _pdsh_base(plan: Plan) -> tuple[list[str], dict[str, str]]:
    """``pdsh`` options up to (not including) ``-w HOSTS``, and its environment."""
    # Respect a user's PDSH_RCMD_TYPE (DeepSpeed overwrote it, #4370).
    env = {} if "PDSH_RCMD_TYPE" in os.environ else {"PDSH_RCMD_TYPE": "ssh"}
    return ["pdsh", "-S", "-f", _PDSH_FANOUT], env


def _pdsh_batches(plan: Plan, budget: int) -> list[range]:
    """Split the nodes into runs whose host table should fit ``budget`` bytes (linear)."""
    batches, start, used, last = [], 0, 0, None
    for rank, node in enumerate(plan.world.nodes):
        group = len(json.dumps([node.slots, node.devices])) + 64
        cost = len(json.dumps(node.host)) + 1 + node.host.count("%")
        if (node.slots, node.devices) != last:
            cost += group
        if used + cost > budget and rank > start:
            batches.append(range(start, rank))
            start, used = rank, group
        used += cost
        last = (node.slots, node.devices)
    batches.append(range(start, len(plan.world.nodes)))
    return batches


def pdsh_commands(plan: Plan) -> list[Command]:
    """``pdsh -S -w HOSTS '...agent --nodes=TABLE --node_host=%h'``, one per batch of nodes.

    pdsh runs one command on many hosts, so the command holds a table of its hosts'
    assignments and each node finds its own by its ``%h`` name. Large jobs are split
    into batches (one pdsh each) so every command stays under Linux's per-argument
    limit. pdsh expands ``%h``/``%n``/``%u`` in the command, so every ``%`` of ours
    is doubled.
    """
    base, env = _pdsh_base(plan)
    extra = _launcher_args(plan)
    head, tail = _agent_parts(plan, watch_stdin=False, job_id=plan.job_id)
    prefix = f"{_remote_prefix(plan)} {shlex.join(head)}".replace("%", "%%")
    suffix = f"--node_host={_HOST_PLACEHOLDER} {shlex.join(tail)}".replace("%", "%%")
    suffix = suffix.replace(_HOST_PLACEHOLDER, "%h")
    fixed = len(prefix.encode()) + len(suffix.encode()) + 16
    if fixed > _REMOTE_COMMAND_MAX // 2:
        raise _too_big(plan, "the pdsh command without its host table", fixed)

    def remote(batch: range) -> str:
        table = encode_node_table(plan.world.assignment(rank) for rank in batch)
        return f"{prefix} {shlex.quote('--nodes=' + table).replace('%', '%%')} {suffix}"

    commands = []
    # Aim 10% below the budget: quoting adds a little beyond the estimate.
    pending = _pdsh_batches(plan, (_REMOTE_COMMAND_MAX - fixed) * 9 // 10)
    while pending:
        batch = pending.pop(0)
        command = remote(batch)
        if len(command.encode()) > _REMOTE_COMMAND_MAX:
            if len(batch) == 1:
                raise _too_big(plan, f"the pdsh command of node {batch.start}", len(command))
            middle = batch.start + len(batch) // 2  # odd host names: the estimate was low
            pending[:0] = [range(batch.start, middle), range(middle, batch.stop)]
            continue
        hosts = ",".join(plan.world.hosts[batch.start : batch.stop])
        label = f"pdsh (nodes {batch.start}-{batch.stop - 1})"
        commands.append(Command(label, [*base, "-w", hosts, *extra, command], env))
    return commands


def pdsh_stop_commands(plan: Plan) -> list[Command]:
    """``pdsh`` commands that send SIGTERM to this job's agents (same batches of hosts)."""
    base, env = _pdsh_base(plan)
    pid_glob = f"/tmp/funczero-{plan.job_id}-node*.pid"
    script = f'for f in {pid_glob}; do kill -TERM "$(cat "$f")"; done 2>/dev/null; true'
    stops = []
    for command in pdsh_commands(plan):
        hosts = command.argv[command.argv.index("-w") + 1]
        stops.append(Command("pdsh stop", [*base, "-w", hosts, *_launcher_args(plan), script], env))
    return stops


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
