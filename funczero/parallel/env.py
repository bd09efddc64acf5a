"""Process-group set-up from the environment.

Ranks come from the launcher variables (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, set by
``funczero launch`` and torchrun), from Open MPI (``OMPI_COMM_WORLD_*``), MPICH/Hydra (``PMI_*``)
or Slurm (``SLURM_*``). A plain ``python script.py`` is world size 1 and needs no set-up.

A group that :func:`init_distributed` creates is torn down at interpreter exit (:func:`shutdown`,
registered with :mod:`atexit`): a process that exits with its process group still alive can abort
in the backend's destructors (gloo: "terminate called without an active exception", exit 134),
turning a finished job into a failed one.

Example:
    >>> from funczero.parallel import env
    >>> env.detect().world_size >= 1
    True
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import sys
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist

__all__ = ["Topology", "detect", "init_distributed", "shutdown"]

# The default group init_distributed() created (None: none, or already torn down); shutdown()
# leaves alone a group the user created or re-created themselves.
_owned_group: object | None = None
_exit_hook_registered = False
# Set when the main thread dies of an exception: then the exit hook leaves the group alone, because
# destroying it waits for this rank's pending collectives, which peers may never join.
_unhandled_exception = False


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this process sits: global and local rank and size, and the source of those numbers."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str


def _int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def detect(env: Mapping[str, str] | None = None) -> Topology:
    """Read the rank layout from launcher, MPI or Slurm variables (world size 1 when none)."""
    env = os.environ if env is None else env
    for source, rank, size, lrank, lsize in (
        ("launcher", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        (
            "openmpi",
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
        ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    ):
        if rank in env and size in env:
            world = _int(env, size)
            r = _int(env, rank)
            if not 0 <= r < world:
                raise ValueError(f"{rank}={r} is outside [0, {size}={world})")
            local_rank = _int(env, lrank) if lrank in env else 0
            local_size = world
            if lsize in env:
                # Slurm writes e.g. "2(x3)" when tasks per node are uniform.
                local_size = int(env[lsize].split("(")[0])
            elif lrank in env:
                local_size = max(local_rank + 1, 1)
            return Topology(r, world, local_rank, local_size, source)
    return Topology(0, 1, 0, 1, "single")


def init_distributed(
    *,
    backend: str | None = None,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> Topology:
    """Initialise ``torch.distributed`` from the environment and bind the device.

    Does nothing beyond returning the topology when the world size is 1 or the default group
    already exists. The backend is NCCL when CUDA is available, else gloo. The timeout comes from
    ``timeout_s``, else ``FUNCZERO_DIST_TIMEOUT`` (seconds), else 600 s. A group created here is
    destroyed at interpreter exit (see :func:`shutdown`). On ranks other than 0, config
    warnings (:class:`funczero.config.ConfigWarning`) are not shown (rank 0 shows them).
    """
    env = os.environ if env is None else env
    topo = detect(env)
    if topo.rank != 0:
        # Every rank loads the same config: rank 0's config warnings say it all.
        from funczero.config.errors import ConfigWarning

        warnings.filterwarnings("ignore", category=ConfigWarning)
    if torch.cuda.is_available():
        torch.cuda.set_device(topo.local_rank % max(torch.cuda.device_count(), 1))
    if topo.world_size == 1 or dist.is_initialized():
        return topo
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise RuntimeError(
            f"world size {topo.world_size} from {topo.source} variables, but MASTER_ADDR/"
            "MASTER_PORT are not set; start through `funczero launch` or torchrun, or export them"
        )
    if timeout_s is None:
        timeout_s = float(env.get("FUNCZERO_DIST_TIMEOUT", "600"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    init_method = f"tcp://{_host(env['MASTER_ADDR'])}:{env['MASTER_PORT']}"
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=topo.rank,
        world_size=topo.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    _adopt_default_group()
    return topo


def _adopt_default_group() -> None:
    global _owned_group, _exit_hook_registered
    _owned_group = dist.group.WORLD
    if not _exit_hook_registered:
        # Registered after torch's import, so it runs before torch's own exit handlers.
        atexit.register(_shutdown_at_exit)
        previous_hook = sys.excepthook

        def note_unhandled_exception(*args: object) -> None:
            global _unhandled_exception
            _unhandled_exception = True
            previous_hook(*args)  # type: ignore[arg-type]

        sys.excepthook = note_unhandled_exception
        _exit_hook_registered = True


def shutdown() -> None:
    """Destroy the default process group if :func:`init_distributed` created it.

    Runs by itself at interpreter exit, except after an unhandled exception (the rank fails anyway,
    and tearing down would wait for its unfinished collectives, which other ranks may never join);
    call it to tear the group down earlier. Idempotent, and a no-op in a single process, after
    ``torch.distributed.destroy_process_group()``, or for a group initialised by other code. It
    waits for no other rank, only for this rank's own pending collectives.

    Example:
        >>> from funczero.parallel import env
        >>> env.shutdown()  # nothing to tear down here; safe to call any number of times
        >>> env.shutdown()
    """
    global _owned_group
    group, _owned_group = _owned_group, None
    if group is None or not dist.is_available() or not dist.is_initialized():
        return
    if dist.group.WORLD is not group:
        return  # destroyed and re-created by the user: theirs to tear down
    dist.destroy_process_group()


def _shutdown_at_exit() -> None:
    if _unhandled_exception:
        return
    try:
        shutdown()
    except Exception as exc:  # noqa: BLE001 - at exit, a one-line warning beats a traceback
        print(
            f"funczero: warning: tearing down the process group at exit failed: {exc}",
            file=sys.stderr,
        )


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
