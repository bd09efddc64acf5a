"""``funczero launch``: run a training script on N processes across M nodes.

The command only parses flags; the work is in :mod:`funczero.launch` (imported
when the command runs, so ``import funczero.cli.app`` stays fast).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperCommand

try:  # typer >= 0.20 vendors click as typer._click; older releases use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import UsageError  # type: ignore[no-redef]

__all__ = ["LAUNCH_CONTEXT_SETTINGS", "LaunchCommand", "launch"]

#: Parsing stops at SCRIPT: everything after it belongs to the script, even
#: options whose names collide with the launcher's (``train.py --num_gpus 4``).
LAUNCH_CONTEXT_SETTINGS: dict[str, Any] = {
    "allow_interspersed_args": False,
    "help_option_names": ["-h", "--help"],
}


class LaunchCommand(TyperCommand):
    """A Typer command whose usage errors are one line, not a box and a usage dump."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        """Parse like Click, but report a usage error as a single line (exit 2)."""
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            typer.echo(
                f"funczero launch: error: {exc.format_message()} (see 'funczero launch --help')",
                err=True,
            )
            ctx.exit(2)


_RESOURCES = "Resources"
_PROGRAM = "Program"
_SUPERVISION = "Supervision and logs"
_MULTINODE = "Multi-node"
_ELASTIC = "Elastic (torch.distributed.elastic)"


def launch(
    script: Annotated[
        str | None,
        typer.Argument(
            help="Training script (a module name with --module).",
            metavar="SCRIPT",
            show_default=False,
        ),
    ] = None,
    script_args: Annotated[
        list[str] | None,
        typer.Argument(
            help="Arguments passed to the script unchanged.",
            metavar="SCRIPT_ARGS",
            show_default=False,
        ),
    ] = None,
    hostfile: Annotated[
        str | None,
        typer.Option(
            "--hostfile",
            "-H",
            help="'HOST slots=N' per line. Default: /job/hostfile when present, else this machine.",
            rich_help_panel=_RESOURCES,
            show_default=False,
        ),
    ] = None,
    include: Annotated[
        str,
        typer.Option(
            "--include",
            "-i",
            help="Use only these hosts/slots: HOST[:SLOT[,SLOT...]][@HOST...].",
            rich_help_panel=_RESOURCES,
        ),
    ] = "",
    exclude: Annotated[
        str,
        typer.Option(
            "--exclude",
            "-e",
            help="Leave out these hosts/slots (same grammar as --include).",
            rich_help_panel=_RESOURCES,
        ),
    ] = "",
    num_nodes: Annotated[
        int | None,
        typer.Option(
            "--num_nodes",
            "--nnodes",
            help="Use the first N hosts.",
            rich_help_panel=_RESOURCES,
            show_default=False,
        ),
    ] = None,
    num_gpus: Annotated[
        int | None,
        typer.Option(
            "--num_gpus",
            "--nproc_per_node",
            "--nproc-per-node",
            "--num_accelerators",
            help="Use the first N slots of every host; with no GPU, the number of CPU "
            "processes (default 1).",
            rich_help_panel=_RESOURCES,
            show_default=False,
        ),
    ] = None,
    module: Annotated[
        bool,
        typer.Option(
            "--module", "-m", help="Run SCRIPT as 'python -m SCRIPT'.", rich_help_panel=_PROGRAM
        ),
    ] = False,
    no_python: Annotated[
        bool,
        typer.Option(
            "--no_python",
            "--no-python",
            help="Execute SCRIPT directly, not through Python.",
            rich_help_panel=_PROGRAM,
        ),
    ] = False,
    no_local_rank: Annotated[
        bool,
        typer.Option(
            "--no_local_rank",
            help="Do not append --local_rank=N to the script's arguments.",
            rich_help_panel=_PROGRAM,
        ),
    ] = False,
    env_file: Annotated[
        str | None,
        typer.Option(
            "--env_file",
            help="KEY=VALUE file exported to every worker, read instead of ~/.funczero_env "
            "and ./.funczero_env.",
            rich_help_panel=_PROGRAM,
            show_default=False,
        ),
    ] = None,
    log_dir: Annotated[
        str | None,
        typer.Option(
            "--log_dir",
            "--log-dir",
            help="Write each rank's stdout+stderr to LOG_DIR/rank-NNNNN.log.",
            rich_help_panel=_SUPERVISION,
            show_default=False,
        ),
    ] = None,
    save_pid: Annotated[
        str | None,
        typer.Option(
            "--save_pid",
            help="Write the per-node launcher's PID to this file ('{node_rank}' is "
            "substituted); removed on exit.",
            rich_help_panel=_SUPERVISION,
            show_default=False,
        ),
    ] = None,
    kill_timeout: Annotated[
        float,
        typer.Option(
            "--kill_timeout",
            help="Seconds between SIGTERM and SIGKILL when stopping workers.",
            rich_help_panel=_SUPERVISION,
        ),
    ] = 30.0,
    bind_cores_to_rank: Annotated[
        bool,
        typer.Option(
            "--bind_cores_to_rank",
            help="Pin each rank to an equal share of the cores; sets OMP_NUM_THREADS.",
            rich_help_panel=_SUPERVISION,
        ),
    ] = False,
    bind_core_list: Annotated[
        str | None,
        typer.Option(
            "--bind_core_list",
            help="Cores to share out, e.g. '0-15,32-47'.",
            rich_help_panel=_SUPERVISION,
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry_run",
            "--dry-run",
            help="Print each node's command and environment; run nothing.",
            rich_help_panel=_SUPERVISION,
        ),
    ] = False,
    launcher: Annotated[
        str | None,
        typer.Option(
            "--launcher",
            help="local, ssh, pdsh, openmpi, mpich or slurm. Default: local for one node, ssh "
            "for several.",
            rich_help_panel=_MULTINODE,
            show_default=False,
        ),
    ] = None,
    launcher_args: Annotated[
        str,
        typer.Option(
            "--launcher_args",
            help="Extra arguments for ssh/pdsh/mpirun/srun (shell-split).",
            rich_help_panel=_MULTINODE,
        ),
    ] = "",
    master_addr: Annotated[
        str | None,
        typer.Option(
            "--master_addr",
            "--master-addr",
            help="Address of the rank-0 host. Default: 127.0.0.1 on one node, else the first host.",
            rich_help_panel=_MULTINODE,
            show_default=False,
        ),
    ] = None,
    master_port: Annotated[
        int | None,
        typer.Option(
            "--master_port",
            "--master-port",
            help="Rendezvous port. Default: a free port on a single node, else 29500; 0 also "
            "picks a free port (single node).",
            rich_help_panel=_MULTINODE,
            show_default=False,
        ),
    ] = None,
    node_rank: Annotated[
        int | None,
        typer.Option(
            "--node_rank",
            "--node-rank",
            help="Start only this node, by hand (run the same command on each node).",
            rich_help_panel=_MULTINODE,
            show_default=False,
        ),
    ] = None,
    elastic: Annotated[
        bool,
        typer.Option(
            "--elastic",
            help="Run under torch.distributed.elastic (c10d rendezvous, restarts).",
            rich_help_panel=_ELASTIC,
        ),
    ] = False,
    min_nodes: Annotated[
        int | None,
        typer.Option(
            "--min_nodes",
            help="Fewest nodes to start with.",
            rich_help_panel=_ELASTIC,
            show_default=False,
        ),
    ] = None,
    max_nodes: Annotated[
        int | None,
        typer.Option(
            "--max_nodes", help="Most nodes to admit.", rich_help_panel=_ELASTIC, show_default=False
        ),
    ] = None,
    max_restarts: Annotated[
        int | None,
        typer.Option(
            "--max_restarts",
            "--max-restarts",
            help="Worker-group restarts after a failure (default 3).",
            rich_help_panel=_ELASTIC,
            show_default=False,
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run_id",
            "--rdzv-id",
            help="Rendezvous id (default: derived from master addr:port).",
            rich_help_panel=_ELASTIC,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run SCRIPT as N workers per node across M nodes, and supervise them.

    \b
    Examples:
      funczero launch --num_gpus 8 train.py --config small.py
      funczero launch -H hosts.txt --include 'worker-1:0,1@worker-2' train.py
      funczero launch --launcher slurm --dry_run -H hosts.txt train.py
    """
    from funczero.launch.errors import LaunchError
    from funczero.launch.launcher import launch as run_launch
    from funczero.launch.options import LaunchOptions

    opts = LaunchOptions(
        script=script,
        script_args=tuple(script_args or ()),
        hostfile=hostfile,
        include=include,
        exclude=exclude,
        num_nodes=num_nodes,
        num_gpus=num_gpus,
        master_addr=master_addr,
        master_port=master_port,
        node_rank=node_rank,
        launcher=launcher.lower() if launcher is not None else None,
        launcher_args=launcher_args,
        module=module,
        no_python=no_python,
        no_local_rank=no_local_rank,
        env_file=env_file,
        log_dir=log_dir,
        save_pid=save_pid,
        bind_cores_to_rank=bind_cores_to_rank,
        bind_core_list=bind_core_list,
        elastic=elastic,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        max_restarts=max_restarts,
        run_id=run_id,
        kill_timeout=kill_timeout,
        dry_run=dry_run,
    )
    try:
        code = run_launch(opts)
    except LaunchError as exc:
        typer.echo(f"funczero launch: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # Ctrl+C before the workers started
        raise typer.Exit(130) from None
    raise typer.Exit(code)
