"""Turn a hostfile (or this machine) plus filters into the job's :class:`World`.

Order of resolution:

1. The pool: the hostfile (``--hostfile``, else ``/job/hostfile`` when present), or
   this machine: its GPUs (the ids in a user-set ``CUDA_VISIBLE_DEVICES``, else
   ``0..n-1``), or ``--num_gpus`` CPU processes when it has none.
2. ``--include`` / ``--exclude`` (DeepSpeed grammar, see :mod:`.hostfile`).
3. ``--num_nodes`` keeps the first N hosts; ``--num_gpus`` the first N slots per host.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from funczero.launch.errors import LaunchError
from funczero.launch.hostfile import Pool, apply_filters, parse_hostfile
from funczero.launch.options import DEFAULT_HOSTFILE, LaunchOptions
from funczero.launch.spec import Node, World

__all__ = ["detect_local_gpus", "find_hostfile", "resolve_world"]

LOCALHOST = "localhost"


def find_hostfile(hostfile: str | None) -> Path | None:
    """Return the hostfile to use, or ``None`` to use this machine.

    Raises:
        LaunchError: If an explicitly given hostfile does not exist.
    """
    if hostfile is not None:
        path = Path(hostfile)
        if not path.is_file():
            state = "is not a regular file" if path.exists() else "does not exist"
            raise LaunchError(
                f"--hostfile {hostfile!r} {state}; pass an existing file, or drop the flag "
                "to run on this machine"
            )
        return path
    default = Path(DEFAULT_HOSTFILE)
    return default if default.is_file() else None


def detect_local_gpus() -> int:
    """Count this machine's visible CUDA/ROCm devices.

    Imports torch only when a GPU driver is present, so the launcher stays fast on
    CPU machines. Honours ``CUDA_VISIBLE_DEVICES`` like torch does.
    """
    driver_present = (
        shutil.which("nvidia-smi") is not None
        or os.path.exists("/dev/nvidiactl")
        or os.path.exists("/dev/kfd")
    )
    if not driver_present:
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_pool(
    opts: LaunchOptions, environ: Mapping[str, str], local_gpus: int
) -> tuple[Node, str]:
    """Return this machine as one node, and its accelerator kind."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if local_gpus > 0:
        tokens = [t.strip() for t in visible.split(",") if t.strip()] if visible else []
        if not tokens:
            return Node(LOCALHOST, tuple(range(local_gpus))), "cuda"
        if all(t.isdigit() for t in tokens):
            return Node(LOCALHOST, tuple(int(t) for t in tokens)), "cuda"
        # GPU UUIDs / MIG ids: slots are positions, CUDA_VISIBLE_DEVICES keeps the names.
        return Node(LOCALHOST, tuple(range(len(tokens))), tuple(tokens)), "cuda"
    count = opts.num_gpus if opts.num_gpus is not None else 1
    return Node(LOCALHOST, tuple(range(count))), "cpu"


def _take_first_slots(pool: Pool, count: int) -> Pool:
    for host, slots in pool.items():
        if len(slots) < count:
            raise LaunchError(
                f"--num_gpus {count} but host {host!r} has only {len(slots)} slot(s) "
                f"({','.join(map(str, slots)) or 'none'}); lower --num_gpus"
            )
    return {host: slots[:count] for host, slots in pool.items()}


def resolve_world(
    opts: LaunchOptions,
    *,
    environ: Mapping[str, str] | None = None,
    local_gpus: int | None = None,
) -> tuple[World, Path | None]:
    """Resolve the nodes and slots this launch uses.

    Args:
        opts: Validated launch options.
        environ: Environment to read ``CUDA_VISIBLE_DEVICES`` from; ``os.environ``.
        local_gpus: GPU count of this machine; detected when ``None`` (tests pass it).

    Returns:
        The world and the hostfile it came from (``None`` for this machine).

    Raises:
        LaunchError: On unknown hosts or slots, impossible counts, or no resources.
    """
    environ = os.environ if environ is None else environ
    hostfile = find_hostfile(opts.hostfile)
    devices: dict[str, tuple[str, ...]] = {}
    if hostfile is not None:
        counts = parse_hostfile(hostfile)
        pool: Pool = {host: list(range(n)) for host, n in counts.items()}
        # With a hostfile, slots are device ids on every node (DeepSpeed's contract).
        accelerator = "cuda"
        source = f"hostfile {hostfile}"
    else:
        gpus = detect_local_gpus() if local_gpus is None else local_gpus
        node, accelerator = _local_pool(opts, environ, gpus)
        pool = {node.host: list(node.slots)}
        if node.devices is not None:
            devices[node.host] = node.devices
        source = "this machine"
    pool = apply_filters(pool, opts.include, opts.exclude)
    pool = {host: slots for host, slots in pool.items() if slots}
    if not pool:
        raise LaunchError(
            f"no resources left to run on: {source} has no usable slots after filtering; "
            "check slots=N in the hostfile and --include/--exclude"
        )
    replicas = 1
    if opts.num_nodes is not None:
        if hostfile is None:
            # Without a hostfile the other nodes are anonymous: only a launcher that does
            # not need their names can use them.
            if opts.num_nodes > 1 and opts.node_rank is None and opts.launcher != "slurm":
                raise LaunchError(
                    f"--num_nodes {opts.num_nodes} needs a hostfile listing the nodes (or "
                    "--node_rank to start each node by hand, or --launcher slurm)"
                )
            replicas = opts.num_nodes
        elif opts.num_nodes > len(pool):
            raise LaunchError(
                f"--num_nodes {opts.num_nodes} but {source} has only {len(pool)} usable "
                f"host(s) ({', '.join(pool)})"
            )
        else:
            pool = dict(list(pool.items())[: opts.num_nodes])
    if opts.num_gpus is not None and not (hostfile is None and accelerator == "cpu"):
        pool = _take_first_slots(pool, opts.num_gpus)
    nodes = []
    for host, slots in pool.items():
        names = devices.get(host)
        node_devices = tuple(names[s] for s in slots) if names is not None else None
        nodes.append(Node(host, tuple(slots), node_devices))
    if replicas > 1:
        (only,) = nodes
        nodes = [Node(f"node{i}", only.slots, only.devices) for i in range(replicas)]
    return World(tuple(nodes), accelerator), hostfile
