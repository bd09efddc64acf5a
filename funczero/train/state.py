"""The training state: one immutable pytree of tensors.

``TrainState`` holds data only; the model, optimizer and ZeRO plan live in the closures that
:func:`funczero.make_train_step` returns. Leaf names are paths
(``params/blocks.0.attn.qkv.weight``, ``opt_state/0/mu/blocks.0.attn.qkv.weight``), the same in
checkpoints, metrics and error messages.

Layout by ZeRO stage (``W`` ranks; "shard" = this rank's flat, zero-padded 1/W of a parameter):

=========  ===========================  ==============================  ====================
stage      ``params``                   ``master`` (fp32, trainable)    ``opt_state`` leaves
=========  ===========================  ==============================  ====================
0          full, compute dtype          full (same tensor as params     full
                                        in fp32)
1, 2       full, compute dtype          shard                           shard
3          shard (= master)             shard                           shard
=========  ===========================  ==============================  ====================

At stage 3, parameters below ``stage3_param_persistence_threshold`` stay full like stage 2.

Donation: with ``donate=True`` (the default of :func:`funczero.make_train_step`) a step reuses
the old state's buffers in place, as JAX's ``donate_argnums``. The old state is then marked
donated and any use of it raises :class:`DonatedStateError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from funczero import struct
from funczero.parallel.layout import ShardSpec

__all__ = ["DonatedStateError", "StateLayout", "TrainState"]

_FIELDS = frozenset(
    {"step", "params", "master", "opt_state", "loss_scale", "buffers", "rng", "skipped", "layout"}
)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Static description of how a state's tensors are laid out on this rank.

    Attributes:
        stage: ZeRO stage 0-3.
        world_size: number of data-parallel ranks.
        rank: this rank.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        shapes: ``(name, global shape)`` of every parameter (canonical FQNs, module order).
        sharded_params: parameters whose ``state.params`` entry is a shard (stage 3).
        trainable: parameters that have master weights and optimizer state.
        aliases: ``(alias FQN, canonical FQN)`` for tied weights (the canonical name is the key
            in ``params``; consolidated checkpoints write every alias).
    """

    stage: int
    world_size: int
    rank: int
    precision: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    sharded_params: frozenset[str]
    trainable: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()

    @property
    def master_sharded(self) -> bool:
        """Master weights and per-parameter optimizer state are shards from stage 1."""
        return self.stage >= 1

    def shard_spec(self, name: str) -> ShardSpec:
        """The flat padded shard layout of parameter ``name`` at this world size."""
        return ShardSpec(name, torch.Size(dict(self.shapes)[name]), self.world_size)


class DonatedStateError(RuntimeError):
    """Raised when a state whose buffers were donated to a step is used again."""


@struct.dataclass
class TrainState:
    """Everything that changes during training, as tensors.

    Attributes:
        step: int64 0-d, optimizer steps attempted (skipped ones included).
        params: compute-dtype parameters keyed by canonical module FQN (full or shard).
        master: fp32 master weights of trainable parameters (full at stage 0, else shards).
        opt_state: the optimizer's state pytree (moments in fp32, laid out like ``master``).
        loss_scale: the dynamic loss scaler's state (constant scale 1 unless fp16).
        buffers: module buffers (BatchNorm statistics...) keyed by FQN, replicated.
        rng: generator state of the compute device (uint8), advanced by each step.
        skipped: int64 0-d, steps skipped because gradients were not finite.
        layout: static (not a leaf): stage, world size, rank and shapes, so checkpoints can be
            written and read into this state without further arguments.
    """

    step: torch.Tensor
    params: dict[str, torch.Tensor]
    master: dict[str, torch.Tensor]
    opt_state: Any
    loss_scale: Any
    buffers: dict[str, torch.Tensor]
    rng: torch.Tensor
    skipped: torch.Tensor
    layout: StateLayout = struct.field(static=True)

    def __getattribute__(self, name: str) -> Any:
        if name in _FIELDS and object.__getattribute__(self, "__dict__").get("_donated"):
            raise DonatedStateError(
                f"this TrainState was donated to train_step (its buffers now hold the next "
                f"step's values), so reading state.{name} is an error; use the state that "
                "train_step returned, or build the step with donate=False to keep old states"
            )
        return object.__getattribute__(self, name)

    def mark_donated(self) -> None:
        """Invalidate this state (called by a donating ``train_step``)."""
        object.__setattr__(self, "_donated", True)

    @property
    def donated(self) -> bool:
        """Whether this state was donated to a step."""
        return bool(object.__getattribute__(self, "__dict__").get("_donated"))
