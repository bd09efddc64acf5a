"""Hand-built training states for checkpoint tests and examples (no model, no training step).

:func:`toy_state` lays out the same global values (a function of ``seed``) for any world size,
rank, ZeRO stage and precision, following the rules of :mod:`funczero.train.state`, so a checkpoint
saved from one layout can be compared with a state built directly in another.

Example:
    >>> s = toy_state(world_size=2, rank=1, stage=3)
    >>> s.params["w"].shape, s.params["w"] is s.master["w"]
    (torch.Size([8]), True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from funczero.optim.base import EmptyState
from funczero.optim.moments import ScaleByAdamState, TraceState
from funczero.parallel.precision import Precision
from funczero.parallel.stages import STAGES
from funczero.parallel.sharding import ShardSpec
from funczero.train.rng import init_rng
from funczero.train.state import TrainState

__all__ = ["SHAPES", "full_values", "toy_state"]

SHAPES: dict[str, tuple[int, ...]] = {
    "emb": (5, 3),
    "w": (4, 4),
    "b": (7,),
    "frozen": (3,),
}
"""Parameters of the toy model; ``frozen`` is not trainable, ``head.weight`` is tied to ``emb``."""
TIED = {"head.weight": "emb"}


def full_values(
    seed: int = 0, shapes: Mapping[str, tuple[int, ...]] = SHAPES
) -> dict[str, torch.Tensor]:
    """The global fp32 values of every parameter for ``seed`` (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def toy_state(
    *,
    world_size: int = 1,
    rank: int = 0,
    stage: int = 0,
    precision: str = "fp32",
    seed: int = 0,
    step: int = 3,
    shapes: Mapping[str, tuple[int, ...]] = SHAPES,
    frozen: Iterable[str] = ("frozen",),
    persistent: Iterable[str] = (),
    optimizer: str = "adam",
) -> TrainState:
    """A consistent :class:`TrainState` of a toy model, laid out for ``(world_size, rank, stage)``.

    Args:
        persistent: stage 3 parameters kept full (below the persistence threshold).
        optimizer: ``"adam"`` (count, mu, nu) or ``"sgd"`` (momentum trace).
    """
    compute = Precision.from_name(precision).compute_dtype
    full = full_values(seed, shapes)
    frozen_set, kept = set(frozen), set(persistent)
    trainable = tuple(n for n in shapes if n not in frozen_set)
    policy = STAGES[stage]
    sharded = frozenset(n for n in shapes if policy.params_at_rest == "shard" and n not in kept)

    def lay(x: torch.Tensor, name: str) -> torch.Tensor:
        if policy.master_sharded:
            return ShardSpec(name, torch.Size(shapes[name]), world_size).shard(x, rank)
        return x.clone()

    master = {n: lay(full[n], n) for n in trainable}
    params: dict[str, torch.Tensor] = {}
    for n in shapes:
        if n in sharded:
            spec = ShardSpec(n, torch.Size(shapes[n]), world_size)
            params[n] = master[n] if n in master else spec.shard(full[n], rank)
        elif n in master and not policy.master_sharded and compute == torch.float32:
            params[n] = master[n]
        else:
            params[n] = full[n].to(compute)
    count = torch.tensor(step, dtype=torch.int64)
    if optimizer == "adam":
        moments = ScaleByAdamState(
            count=count.clone(),
            mu={n: lay(full[n] * 0.1 + seed, n) for n in trainable},
            nu={n: lay(full[n] ** 2, n) for n in trainable},
        )
    elif optimizer == "sgd":
        moments = TraceState(trace={n: lay(full[n] * -0.5, n) for n in trainable})  # type: ignore[assignment]
    else:
        raise ValueError(f"optimizer={optimizer!r} must be 'adam' or 'sgd'")
    return TrainState.create(
        stage=stage,
        world_size=world_size,
        rank=rank,
        precision=precision,
        shapes=shapes,
        trainable=trainable,
        sharded_params=sharded,
        step=torch.tensor(step, dtype=torch.int64),
        params=params,
        master=master,
        opt_state=(moments, EmptyState()),
        loss_scale=(torch.tensor(2.0**seed), torch.tensor(seed, dtype=torch.int32)),
        buffers={
            "running_mean": torch.linspace(-1.0, 1.0, 4) * seed,
            "num_batches": torch.tensor(seed + 7),
        },
        rng=init_rng(seed + 1000, device=torch.device("cpu"), rank=rank),
        skipped=torch.tensor(1, dtype=torch.int64),
    )
