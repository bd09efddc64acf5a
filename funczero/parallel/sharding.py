"""How parameters are laid out across ranks: per-parameter flat shards grouped into units.

Every parameter is flattened and zero-padded to ``world_size * shard_numel`` elements; rank ``r``
holds elements ``[r * shard_numel, (r + 1) * shard_numel)`` (FSDP2's even per-parameter sharding,
flattened). Padding to a multiple of the world size matters: an uneven all-gather on gloo hangs
without an error. The same layout serves stages 1-3, so a checkpoint written by one stage reads
into any other.

A *unit* is the group of parameters communicated together: one transformer block, or the root
(everything not inside a block). Its shards are packed back to back into one ``[S]`` buffer, so a
unit costs one all-gather and one reduce-scatter of ``world_size * S`` elements.

Example:
    >>> import torch
    >>> spec = ShardSpec("w", torch.Size([5]), world_size=2)
    >>> spec.shard_numel, spec.padded_numel
    (3, 6)
    >>> spec.shard(torch.arange(5.0), rank=1)
    tensor([3., 4., 0.])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["ShardSpec", "Unit"]


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Layout of one parameter: global shape, and the flat padded chunk each rank holds."""

    name: str
    shape: torch.Size
    world_size: int
    # Derived once at construction: the step reads them for every unit of every step.
    numel: int = dataclasses.field(init=False, repr=False, compare=False)
    shard_numel: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        numel = math.prod(self.shape)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "shard_numel", -(-numel // self.world_size))

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

    def bounds(self, rank: int) -> tuple[int, int]:
        """Range ``[start, stop)`` of the flattened parameter held by ``rank`` (without padding)."""
        start = min(rank * self.shard_numel, self.numel)
        return start, min(start + self.shard_numel, self.numel)

    def shard(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Return ``rank``'s zero-padded 1-D chunk of ``full`` as a new tensor."""
        if full.shape != self.shape:
            raise ValueError(
                f"{self.name}: expected shape {tuple(self.shape)}, got {tuple(full.shape)}"
            )
        out = full.new_zeros(self.shard_numel)
        start, stop = self.bounds(rank)
        out[: stop - start] = full.reshape(-1)[start:stop]
        return out

    def full(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Reassemble the parameter from all ranks' shards (rank order)."""
        if len(shards) != self.world_size:
            raise ValueError(f"{self.name}: need {self.world_size} shards, got {len(shards)}")
        return torch.cat([s.reshape(-1) for s in shards])[: self.numel].view(self.shape)


@dataclasses.dataclass(frozen=True)
class Unit:
    """A group of parameters gathered and reduced together.

    Attributes:
        name: module FQN of the unit (``""`` for the root unit).
        params: canonical parameter names in the unit, in module order.
        specs: their shard specs.
    """

    name: str
    params: tuple[str, ...]
    specs: tuple[ShardSpec, ...]
    # Derived once at construction (read per unit per step).
    shard_sizes: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
    shard_numel: int = dataclasses.field(init=False, repr=False, compare=False)
    """``S``: elements of this unit held by one rank."""
    numel: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = tuple(s.shard_numel for s in self.specs)
        object.__setattr__(self, "shard_sizes", sizes)
        object.__setattr__(self, "shard_numel", sum(sizes))
        object.__setattr__(self, "numel", sum(s.numel for s in self.specs))

    @property
    def world_size(self) -> int:
        return self.specs[0].world_size if self.specs else 1

    def restrict(self, names: Iterable[str]) -> Unit:
        """This unit with only the parameters in ``names`` (same name and order)."""
        keep = set(names)
        pairs = [(n, s) for n, s in zip(self.params, self.specs) if n in keep]
        return Unit(self.name, tuple(n for n, _ in pairs), tuple(s for _, s in pairs))

    def pack_shards(self, shards: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Concatenate this rank's shards into one ``[S]`` send buffer of ``dtype``."""
        parts = [shards[n].reshape(-1) for n in self.params]
        if all(p.dtype == dtype for p in parts):
            return torch.cat(parts)
        # Cast while copying (one pass over the shards instead of cast, then concatenate).
        out = torch.empty(self.shard_numel, dtype=dtype, device=parts[0].device)
        torch._foreach_copy_(list(out.split(self.shard_sizes)), parts)
        return out

    def unpack_gathered(self, gathered: torch.Tensor) -> dict[str, torch.Tensor]:
        """Turn an all-gathered ``[W * S]`` buffer into full parameters.

        One copy (``split_with_sizes_copy``) moves every parameter's chunks next to each other in
        a padded buffer; the returned tensors are views into it, so they share one storage that
        the ZeRO-3 backward hooks recognise.
        """
        w = self.world_size
        full = gathered.new_empty(self.shard_numel * w)
        regions = full.split([s * w for s in self.shard_sizes])
        torch.split_with_sizes_copy(
            gathered.view(w, self.shard_numel),
            self.shard_sizes,
            dim=1,
            out=[r.view(w, s) for r, s in zip(regions, self.shard_sizes)],
        )
        return {
            spec.name: region[: spec.numel].view(spec.shape)
            for spec, region in zip(self.specs, regions)
        }

    def chunk_grads(self, grads: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Lay full gradients out as ``[W, S]`` (rank ``r``'s chunk of every parameter in row ``r``)."""
        flat = [grads[n].reshape(-1) for n in self.params]
        if len({f.dtype for f in flat}) > 1:
            flat = [f.to(dtype) for f in flat]
        out = torch.empty(self.world_size, self.shard_numel, dtype=dtype, device=flat[0].device)
        # _chunk_cat casts while it copies (CUDA has a fused bf16 -> fp32 kernel, FSDP2's
        # reduce-scatter copy-in): one pass instead of a cast pass and a copy pass.
        torch._chunk_cat(flat, dim=0, num_chunks=self.world_size, out=out)
        return out

    def split_shard(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a packed ``[S]`` buffer into per-parameter shard views."""
        return dict(zip(self.params, flat.split(self.shard_sizes)))
