"""The config's sub-blocks: their frozen dataclasses, and the ZeRO block's legacy forms.

The dataclass defaults come from the key table (:mod:`funczero.config.keys`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from funczero.config.errors import show, warn
from funczero.config.keys import (
    DEPRECATED_ZERO,
    KEY_HOMES,
    OFFLOAD_OPTIMIZER,
    OFFLOAD_PARAM,
    ZERO,
    default,
)
from funczero.config.schema import parse_block

__all__ = ["BF16Config", "FP16Config", "FunczeroConfig", "ZeroConfig", "parse_zero"]

_frozen = dataclasses.dataclass(frozen=True)


@_frozen
class FP16Config:
    """The ``"fp16"`` block (DeepSpeed's keys and defaults; see docs/config.md)."""

    enabled: bool = default("fp16.enabled")
    auto_cast: bool = default("fp16.auto_cast")
    loss_scale: float = default("fp16.loss_scale")
    initial_scale_power: int = default("fp16.initial_scale_power")
    loss_scale_window: int = default("fp16.loss_scale_window")
    hysteresis: int = default("fp16.hysteresis")
    consecutive_hysteresis: bool = default("fp16.consecutive_hysteresis")
    min_loss_scale: float = default("fp16.min_loss_scale")

    @property
    def dynamic_loss_scale(self) -> bool:
        """Whether the loss scale adapts (``loss_scale == 0``) rather than staying fixed."""
        return self.loss_scale == 0


@_frozen
class BF16Config:
    """The ``"bf16"`` block (legacy name ``"bfloat16"``)."""

    enabled: bool = default("bf16.enabled")
    check_grad_overflow: bool = default("bf16.check_grad_overflow")


def _z(name: str) -> Any:
    return default(f"zero_optimization.{name}")


@_frozen
class ZeroConfig:
    """The ``"zero_optimization"`` block. Sizes count elements, not bytes, as in DeepSpeed.

    ``overlap_comm=None`` resolves as DeepSpeed's code does: true for stage 3, false otherwise.
    """

    stage: int = _z("stage")
    contiguous_gradients: bool = _z("contiguous_gradients")
    reduce_scatter: bool = _z("reduce_scatter")
    reduce_bucket_size: int = _z("reduce_bucket_size")
    allgather_partitions: bool = _z("allgather_partitions")
    allgather_bucket_size: int = _z("allgather_bucket_size")
    overlap_comm: bool = _z("overlap_comm")
    sub_group_size: int = _z("sub_group_size")
    stage3_prefetch_bucket_size: int = _z("stage3_prefetch_bucket_size")
    stage3_param_persistence_threshold: int = _z("stage3_param_persistence_threshold")
    stage3_max_live_parameters: int = _z("stage3_max_live_parameters")
    stage3_max_reuse_distance: int = _z("stage3_max_reuse_distance")
    stage3_gather_16bit_weights_on_model_save: bool = _z(
        "stage3_gather_16bit_weights_on_model_save"
    )
    mics_shard_size: int = _z("mics_shard_size")

    def __post_init__(self) -> None:
        if self.overlap_comm is None:
            object.__setattr__(self, "overlap_comm", self.stage == 3)


@_frozen
class FunczeroConfig:
    """The funczero-only ``"funczero"`` block (DeepSpeed ignores unknown top-level keys)."""

    seed: int | None = default("funczero.seed")
    raise_at_min_loss_scale: bool = default("funczero.raise_at_min_loss_scale")
    no_decay_for_norms_and_biases: bool = default("funczero.no_decay_for_norms_and_biases")


def parse_zero(value: Any, allgather_size: int, errors: list[str]) -> dict[str, Any]:
    """Validate ``zero_optimization``, mapping its legacy boolean form and deprecated keys.

    Args:
        value: the block as given (an object, or DeepSpeed's legacy ``true``/``false``).
        allgather_size: the top-level ``allgather_size`` (the legacy form's bucket size).
        errors: problems are appended here.

    Returns:
        Every ZeRO key's value, defaults filled in.
    """
    if isinstance(value, bool):
        warn(
            f'"zero_optimization": {show(value)} is DeepSpeed\'s deprecated form; write '
            f'"zero_optimization": {{"stage": {int(value)}}}'
        )
        value = {"stage": 1, "allgather_bucket_size": allgather_size} if value else {}
    raw = dict(value)
    for old, new in DEPRECATED_ZERO.items():
        if old not in raw:
            continue
        v = raw.pop(old)
        path = f"zero_optimization.{old}"
        if old in ("cpu_offload", "cpu_offload_param") and v:
            errors.append(
                f"{path}={show(v)} (deprecated name of {new}) asks for CPU offload, which "
                "funczero does not implement; remove the key"
            )
        elif old == "stage3_gather_fp16_weights_on_model_save":
            if new in raw or "gather_16bit_weights_on_model_save" in raw:
                errors.append(f"{path} and its replacement {new} are both given; keep only {new}")
            else:
                raw[new] = v
                warn(f"{path} is deprecated; renamed to zero_optimization.{new}")
        else:
            warn(f"{path} is deprecated (replaced by {new}) and has no effect in funczero")
    zero = parse_block(raw, "zero_optimization", ZERO, errors, KEY_HOMES)
    for name, table in (("offload_param", OFFLOAD_PARAM), ("offload_optimizer", OFFLOAD_OPTIMIZER)):
        if zero[name] is not None:
            parse_block(zero[name], f"zero_optimization.{name}", table, errors, KEY_HOMES)
    return zero
