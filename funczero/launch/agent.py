"""Entry point of the per-node launcher on remote nodes.

The ssh and pdsh runners start ``python -u -m funczero.launch.agent [options] --
SCRIPT [ARGS...]`` on every node (see :func:`funczero.launch.runners.agent_argv`).
This is an internal interface: options mirror ``funczero launch``, but the node's
part of the world comes pre-resolved in ``--nodes`` (a table made by
:func:`funczero.launch.spec.encode_node_table`: this node alone for ssh, a batch of
nodes looked up by ``--node_host`` for pdsh).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from funczero.launch.errors import LaunchError
from funczero.launch.options import DEFAULT_KILL_TIMEOUT, parse_core_list
from funczero.launch.spec import NodeAssignment, Program, decode_node_table

__all__ = ["main", "parse_args"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise LaunchError(f"funczero.launch.agent: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m funczero.launch.agent", add_help=True)
    parser.add_argument("--nodes", required=True)
    parser.add_argument("--node_host")
    parser.add_argument("--master_addr", required=True)
    parser.add_argument("--master_port", type=int, required=True)
    parser.add_argument("--kill_timeout", type=float, default=DEFAULT_KILL_TIMEOUT)
    parser.add_argument("--log_dir")
    parser.add_argument("--save_pid")
    parser.add_argument("--bind_cores_to_rank", action="store_true")
    parser.add_argument("--bind_core_list")
    parser.add_argument("--module", action="store_true")
    parser.add_argument("--no_python", action="store_true")
    parser.add_argument("--no_local_rank", action="store_true")
    parser.add_argument("--watch_stdin", action="store_true")
    parser.add_argument("--job_id")
    parser.add_argument("--elastic", action="store_true")
    parser.add_argument("--min_nodes", type=int, default=1)
    parser.add_argument("--max_nodes", type=int, default=1)
    parser.add_argument("--max_restarts", type=int, default=0)
    parser.add_argument("--run_id", default="")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``OPTIONS -- SCRIPT ARGS`` and parse the options."""
    argv = list(argv)
    if "--" not in argv:
        raise LaunchError("funczero.launch.agent: expected '-- SCRIPT [ARGS...]' after the options")
    cut = argv.index("--")
    command = argv[cut + 1 :]
    if not command:
        raise LaunchError("funczero.launch.agent: missing SCRIPT after '--'")
    return _parser().parse_args(argv[:cut]), command


def _assignment(args: argparse.Namespace) -> NodeAssignment:
    try:
        return decode_node_table(args.nodes, args.node_host)
    except ValueError as exc:
        raise LaunchError(f"funczero.launch.agent: --nodes: {exc}") from None


def run(argv: Sequence[str]) -> int:
    """Run this node's part of the job; return its exit code."""
    args, command = parse_args(argv)
    node = _assignment(args)
    program = Program(
        script=command[0],
        args=tuple(command[1:]),
        module=args.module,
        no_python=args.no_python,
        no_local_rank=args.no_local_rank,
    )
    if args.elastic:
        from funczero.launch.elastic import ElasticConfig, run_elastic

        return run_elastic(
            ElasticConfig(
                program=program,
                nproc=len(node.slots),
                min_nodes=args.min_nodes,
                max_nodes=args.max_nodes,
                max_restarts=args.max_restarts,
                master_addr=args.master_addr,
                master_port=args.master_port,
                run_id=args.run_id,
                log_dir=args.log_dir,
                kill_timeout=args.kill_timeout,
                visible_devices=node.visible_devices() if node.accelerator == "cuda" else None,
                save_pid=args.save_pid,
            )
        )
    from funczero.launch.node import NodeConfig, run_node

    return run_node(
        NodeConfig(
            node=node,
            master_addr=args.master_addr,
            master_port=args.master_port,
            program=program,
            log_dir=args.log_dir,
            save_pid=args.save_pid,
            bind_cores=args.bind_cores_to_rank,
            core_list=tuple(parse_core_list(args.bind_core_list)) if args.bind_core_list else None,
            kill_timeout=args.kill_timeout,
            watch_stdin=args.watch_stdin,
            job_id=args.job_id,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: one-line errors, exit codes as documented in ``docs/launcher.md``."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except LaunchError as exc:
        print(f"funczero launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
