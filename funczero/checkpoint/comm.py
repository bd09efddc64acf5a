"""The little communication a checkpoint needs: barriers and gathering small JSON records.

Tensors never travel: each rank reads and writes its own bytes. What is exchanged is a few
hundred bytes per rank (file checksums, success or the error message) so that every rank
reaches the same decision, and rank 0 can commit. JSON is sent as a byte tensor, not through
``all_gather_object`` (which pickles).

Example:
    >>> all_gather_json({"ok": True}, world_size=1)
    [{'ok': True}]
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_json", "barrier", "check_world"]


def check_world(world_size: int, rank: int, *, need_group: bool = True) -> None:
    """Raise if the state's ``(world_size, rank)`` disagree with the process group.

    ``need_group=False`` (load, which communicates nothing) accepts a missing process group,
    so one process can read any rank's view of a checkpoint.
    """
    if world_size == 1:
        return
    if not dist.is_available() or not dist.is_initialized():
        if not need_group:
            return
        raise RuntimeError(
            f"the state's layout says world_size={world_size}, but torch.distributed is not "
            "initialised; call funczero.init_distributed() (every rank calls save/load)"
        )
    peers, me = dist.get_world_size(), dist.get_rank()
    # Hybrid sharding: the state's layout is its shard group's (rank = replica * size + shard).
    hybrid = peers % world_size == 0 and me % world_size == rank
    if (peers, me) != (world_size, rank) and not hybrid:
        raise RuntimeError(
            f"the state's layout is rank {rank} of {world_size}, but this process is rank "
            f"{dist.get_rank()} of {dist.get_world_size()} in the default process group"
        )


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(world_size: int) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size > 1:
        dist.barrier()


def all_gather_json(obj: Any, world_size: int) -> list[Any]:
    """Gather one JSON-serialisable object from every rank, in rank order, on every rank."""
    data = json.dumps(obj).encode()
    if world_size == 1:
        return [json.loads(data)]
    device = _device()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    bufs = [torch.empty_like(buf) for _ in range(world_size)]
    dist.all_gather(bufs, buf)
    return [
        json.loads(bytes(b[: int(s.item())].cpu().numpy().tobytes())) for b, s in zip(bufs, sizes)
    ]
