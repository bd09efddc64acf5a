"""Process-group set-up from the environment.

Ranks come from the launcher variables (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, set by
``funczero launch`` and torchrun), from Open MPI (``OMPI_COMM_WORLD_*``), MPICH/Hydra (``PMI_*``)
or Slurm (``SLURM_*``). A plain ``python script.py`` is world size 1 and needs no set-up.

Example:
    >>> from funczero.parallel import env
    >>> env.detect().world_size >= 1
    True
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

__all__ = ["Topology", "detect", "init_distributed"]


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
    ``timeout_s``, else ``FUNCZERO_DIST_TIMEOUT`` (seconds), else 600 s.
    """
    env = os.environ if env is None else env
    topo = detect(env)
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
    return topo


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
