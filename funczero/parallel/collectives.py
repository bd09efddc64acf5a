"""The collectives ZeRO is made of, on padded unit buffers.

Collective: every rank in ``group`` must call each function here in the same order with
identically structured inputs. With ``world_size == 1`` (``group is None``) they do no
communication, so single-process runs need no process group.

Example:
    >>> import torch
    >>> all_reduce_mean_([torch.ones(2)], group=None, world_size=1, dtype=torch.float32)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from funczero.parallel.layout import Unit

# torch 2.13 renamed the flat-tensor collectives; keep working on torch >= 2.5.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = [
    "all_gather_unit",
    "all_reduce_mean_",
    "all_reduce_sum",
    "reduce_scatter_unit",
]


def all_reduce_mean_(
    tensors: Sequence[torch.Tensor],
    *,
    group: Any,
    world_size: int,
    dtype: torch.dtype,
    bucket_numel: int = 2**27,
) -> None:
    """Average ``tensors`` across ranks in place, in buckets of at most ``bucket_numel`` elements.

    Each bucket is flattened into one buffer of ``dtype`` so a model of many small tensors costs
    a few large all-reduces rather than one per tensor.
    """
    if world_size == 1 or not tensors:
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for t in list(tensors) + [None]:  # type: ignore[list-item]
        if t is not None and (not bucket or size + t.numel() <= bucket_numel):
            bucket.append(t)
            size += t.numel()
            continue
        flat = torch.cat([b.reshape(-1).to(dtype) for b in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
        for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
            b.copy_(part.view_as(b))
        if t is not None:
            bucket, size = [t], t.numel()


def reduce_scatter_unit(
    unit: Unit,
    grads: Mapping[str, torch.Tensor],
    *,
    group: Any,
    rank: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype = torch.float32,
    use_all_reduce: bool = False,
) -> dict[str, torch.Tensor]:
    """Average full gradients across ranks and return this rank's shard of each.

    ``use_all_reduce`` swaps the reduce-scatter for an all-reduce plus slice (DeepSpeed's
    ``reduce_scatter: false``); on gloo that is the faster of the two.
    """
    chunks = unit.chunk_grads(grads, dtype)  # [W, S]
    world = unit.world_size
    if world == 1:
        shard = chunks[0]
    elif use_all_reduce:
        dist.all_reduce(chunks, op=dist.ReduceOp.AVG, group=group)
        shard = chunks[rank]
    else:
        shard = chunks.new_empty(unit.shard_numel)
        _reduce_scatter_flat(shard, chunks.view(-1), op=dist.ReduceOp.AVG, group=group)
    return unit.split_shard(shard.to(out_dtype))


def all_gather_unit(
    unit: Unit,
    shards: Mapping[str, torch.Tensor],
    *,
    group: Any,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Gather every rank's shards of ``unit`` into full parameters of ``dtype`` (views of one buffer)."""
    send = unit.pack_shards(shards, dtype)
    if unit.world_size == 1:
        return unit.unpack_gathered(send)
    gathered = send.new_empty(send.numel() * unit.world_size)
    _all_gather_flat(gathered, send, group=group)
    return unit.unpack_gathered(gathered)


def all_reduce_sum(x: torch.Tensor, *, group: Any, world_size: int) -> torch.Tensor:
    """Sum ``x`` across ranks (returns a new tensor; ``x`` untouched)."""
    if world_size == 1:
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
    return y
