"""Top level of ``funczero launch``: plan, then dry-run or run through the runner."""

from __future__ import annotations

import shlex
import shutil

from funczero.launch.errors import LaunchError
from funczero.launch.node import plan_workers, run_node
from funczero.launch.options import MPI_LAUNCHERS, LaunchOptions
from funczero.launch.plan import Plan, make_plan
from funczero.launch.remote import Supervisor
from funczero.launch.runners import (
    Command,
    mpi_command,
    pdsh_commands,
    pdsh_stop_commands,
    ssh_commands,
)

__all__ = ["execute", "launch", "render_plan", "runner_commands"]


def launch(opts: LaunchOptions) -> int:
    """Run ``funczero launch`` with parsed options; return the exit code.

    Raises:
        LaunchError: On misuse (the CLI prints it as one line).
    """
    plan = make_plan(opts)
    if opts.dry_run:
        print(render_plan(plan))
        return 0
    return execute(plan)


def runner_commands(plan: Plan) -> list[Command]:
    """The processes a multi-node runner starts (empty for ``local``)."""
    if plan.launcher == "ssh":
        return ssh_commands(plan)
    if plan.launcher == "pdsh":
        return pdsh_commands(plan)
    if plan.launcher in MPI_LAUNCHERS:
        return [mpi_command(plan)]
    return []


def execute(plan: Plan) -> int:
    """Run a plan; return the job's exit code."""
    if plan.launcher == "local":
        if plan.opts.elastic:
            from funczero.launch.elastic import run_elastic

            return run_elastic(plan.elastic_config(plan.local_node_rank))
        return run_node(plan.node_config(plan.local_node_rank))
    commands = runner_commands(plan)
    tool = commands[0].argv[0]
    if shutil.which(tool) is None:
        raise LaunchError(
            f"--launcher {plan.launcher} needs {tool!r} on PATH, and it is not there; install "
            "it or choose another --launcher (ssh needs only an ssh client)"
        )
    if plan.launcher in MPI_LAUNCHERS and not plan.opts.no_local_rank:
        print(
            f"funczero launch: note: with --launcher {plan.launcher} the script gets no "
            "--local_rank argument; workers read their ranks from the environment",
            flush=True,
        )
    supervisor = Supervisor(
        commands,
        kill_timeout=plan.opts.kill_timeout,
        hold_stdin=plan.launcher == "ssh",
        stop_commands=pdsh_stop_commands(plan) if plan.launcher == "pdsh" else (),
        job_id=plan.job_id if plan.launcher == "pdsh" else None,
    )
    return supervisor.run()


def render_plan(plan: Plan) -> str:
    """Describe what would run: each node's command and environment."""
    world = plan.world
    header = (
        f"# funczero launch --dry_run: launcher {plan.launcher}, {len(world.nodes)} node(s), "
        f"world size {world.world_size}, master {plan.master_addr}:{plan.master_port}"
    )
    lines = [header]
    for rank, node in enumerate(world.nodes):  # linear: ranks() is O(1)
        ranks = world.ranks(rank)
        lines.append(
            f"# node {rank} ({node.host}): ranks {ranks.start}-{ranks.stop - 1}, "
            f"slots {','.join(map(str, node.slots))}"
        )
    if plan.exports:
        exported = " ".join(shlex.quote(f"{k}={v}") for k, v in plan.exports.items())
        lines.append(f"# exported to every node: {exported}")
    if plan.launcher != "local":
        lines.extend(command.render() for command in runner_commands(plan))
        if plan.launcher == "pdsh":
            lines.extend(
                "# on failure or signal: " + stop.render() for stop in pdsh_stop_commands(plan)
            )
        return "\n".join(lines)
    node_rank = plan.local_node_rank
    if plan.opts.elastic:
        from funczero.launch.elastic import LOCAL_RANK_MACRO

        config = plan.elastic_config(node_rank)
        lines.append(
            f"# elastic: torch.distributed.elastic, c10d rendezvous at {config.master_addr}:"
            f"{config.master_port} id {config.run_id}, nodes {config.min_nodes}-"
            f"{config.max_nodes}, {config.nproc} worker(s) per node, max_restarts "
            f"{config.max_restarts}"
        )
        lines.append(shlex.join(config.program.argv(LOCAL_RANK_MACRO)))
        return "\n".join(lines)
    for worker in plan_workers(plan.node_config(node_rank)):
        cpus = f" (cpus {','.join(map(str, worker.cpus))})" if worker.cpus else ""
        lines.append(f"# rank {worker.rank}{cpus}")
        lines.append(Command("", worker.argv, worker.env).render())
    return "\n".join(lines)
