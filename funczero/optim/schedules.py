"""Learning-rate (and momentum) schedules: pure tensor functions of the update count.

A schedule maps the int64 ``count`` tensor (the number of *applied* updates so far; the first
update sees ``count == 0``, a step skipped for overflow does not advance it) to a float32 0-d tensor
on the count's device. Schedules are plain tensor math (``torch.where``, no ``.item()``, no Python
branch on a tensor value), so changing the rate never forces a host sync or a recompile. Internally
they compute in float64 (float32 on MPS) and round once to float32.

The generic schedules follow optax's semantics. DeepSpeed's (``warmup_lr``, ``warmup_decay_lr``,
``warmup_cosine_lr``, ``one_cycle``, ``lr_range_test``; :func:`from_deepspeed` reads a config's
``scheduler`` section) reproduce ``deepspeed.runtime.lr_schedules`` step for step, including its
step origin: see :mod:`funczero.optim.deepspeed_schedules`.

Example:
    >>> import torch
    >>> sched = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=4)
    >>> [round(float(sched(torch.tensor(c))), 3) for c in range(6)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from funczero.optim._common import check_float, scalar_dtype
from funczero.optim.base import Schedule
from funczero.optim.deepspeed_schedules import (
    DEEPSPEED_SCHEDULES,
    lr_range_test,
    one_cycle,
    warmup_cosine_lr,
    warmup_decay_lr,
    warmup_lr,
)

__all__ = [
    "DEEPSPEED_SCHEDULES",
    "constant_schedule",
    "cosine_decay_schedule",
    "from_deepspeed",
    "join_schedules",
    "linear_schedule",
    "lr_range_test",
    "one_cycle",
    "warmup_cosine_decay_schedule",
    "warmup_cosine_lr",
    "warmup_decay_lr",
    "warmup_lr",
]


def _f64(count: Tensor | int) -> Tensor:
    count = torch.as_tensor(count)
    return count.to(scalar_dtype(count.device))


def _steps(who: str, name: str, value: int, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}: {name}={value!r} must be an int (a number of updates)")
    if value < low:
        raise ValueError(f"{who}: {name}={value} must be >= {low}")
    return value


def constant_schedule(value: float) -> Schedule:
    """Return ``value`` at every count.

    Example:
        >>> import torch
        >>> constant_schedule(0.1)(torch.tensor(7))
        tensor(0.1000)
    """
    value = check_float("constant_schedule", "value", value)

    def schedule(count: Tensor) -> Tensor:
        return torch.full((), value, dtype=torch.float32, device=torch.as_tensor(count).device)

    return schedule


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Interpolate linearly from ``init_value`` to ``end_value`` (optax semantics).

    Holds ``init_value`` for ``transition_begin`` counts, moves over ``transition_steps`` counts,
    then holds ``end_value``. ``transition_steps == 0`` gives a constant ``init_value``.

    Example:
        >>> import torch
        >>> s = linear_schedule(1.0, 0.0, transition_steps=4)
        >>> [float(s(torch.tensor(c))) for c in (0, 2, 4, 9)]
        [1.0, 0.5, 0.0, 0.0]
    """
    init_value = check_float("linear_schedule", "init_value", init_value)
    end_value = check_float("linear_schedule", "end_value", end_value)
    transition_steps = _steps("linear_schedule", "transition_steps", transition_steps)
    transition_begin = _steps("linear_schedule", "transition_begin", transition_begin)
    if transition_steps == 0:
        return constant_schedule(init_value)

    def schedule(count: Tensor) -> Tensor:
        c = torch.clamp(_f64(count) - transition_begin, 0, transition_steps)
        frac = 1.0 - c / transition_steps
        return ((init_value - end_value) * frac + end_value).to(torch.float32)

    return schedule


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    r"""Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps`` (optax).

    .. math::
        v(c) = v_0\left((1-\alpha)\left(\tfrac{1 + \cos(\pi \min(c, D)/D)}{2}\right)^{e}
        + \alpha\right)

    Example:
        >>> import torch
        >>> s = cosine_decay_schedule(2.0, decay_steps=2)
        >>> [float(s(torch.tensor(c))) for c in (0, 1, 2, 3)]
        [2.0, 1.0, 0.0, 0.0]
    """
    init_value = check_float("cosine_decay_schedule", "init_value", init_value)
    decay_steps = _steps("cosine_decay_schedule", "decay_steps", decay_steps, low=1)
    alpha = check_float("cosine_decay_schedule", "alpha", alpha)
    exponent = check_float("cosine_decay_schedule", "exponent", exponent)

    def schedule(count: Tensor) -> Tensor:
        c = torch.clamp(_f64(count), max=decay_steps)
        cosine = 0.5 * (1.0 + torch.cos(math.pi * c / decay_steps))
        return (init_value * ((1.0 - alpha) * cosine**exponent + alpha)).to(torch.float32)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` between ``boundaries[i-1]`` and ``boundaries[i]`` (optax semantics).

    Each schedule after the first sees the count relative to its start, ``count - boundary``.

    Example:
        >>> import torch
        >>> s = join_schedules([constant_schedule(1.0), linear_schedule(1.0, 0.0, 2)], [3])
        >>> [float(s(torch.tensor(c))) for c in (2, 3, 4, 5)]
        [1.0, 1.0, 0.5, 0.0]
    """
    schedules = list(schedules)
    boundaries = [_steps("join_schedules", "boundary", b) for b in boundaries]
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join_schedules: got {len(schedules)} schedules and {len(boundaries)} boundaries; "
            "pass one boundary fewer than schedules"
        )

    def schedule(count: Tensor) -> Tensor:
        count = torch.as_tensor(count)
        out = schedules[0](count).to(torch.float32)
        for boundary, sched in zip(boundaries, schedules[1:]):
            out = torch.where(count < boundary, out, sched(count - boundary).to(torch.float32))
        return out

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value`` (optax semantics).

    ``decay_steps`` counts the warmup too: the decay ends at count ``decay_steps``.

    Example:
        >>> import torch
        >>> s = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=1, decay_steps=3)
        >>> [float(s(torch.tensor(c))) for c in (0, 1, 2, 3)]
        [0.0, 1.0, 0.5, 0.0]
    """
    who = "warmup_cosine_decay_schedule"
    peak_value = check_float(who, "peak_value", peak_value)
    end_value = check_float(who, "end_value", end_value)
    warmup_steps = _steps(who, "warmup_steps", warmup_steps)
    decay_steps = _steps(who, "decay_steps", decay_steps)
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"{who}: decay_steps={decay_steps} must be > warmup_steps={warmup_steps}; "
            "decay_steps includes the warmup, as in optax"
        )
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, warmup_steps),
            cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent),
        ],
        [warmup_steps],
    )


# --------------------------------------------------------------------------- config entry point


def from_deepspeed(
    type: str,
    params: Mapping[str, Any],
    *,
    base_lr: float,
) -> tuple[Schedule, Schedule | None]:
    """Build schedules from a DeepSpeed ``"scheduler": {"type": ..., "params": {...}}`` section.

    Args:
        type: ``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle`` or ``LRRangeTest``
            (case-sensitive, as DeepSpeed looks them up).
        params: The section's ``params``; DeepSpeed's defaults fill missing keys.
        base_lr: The optimizer's ``lr``: ``WarmupLR``'s default ``warmup_max_lr`` and
            ``WarmupCosineLR``'s base rate (DeepSpeed reads both from the optimizer).

    Returns:
        ``(lr_schedule, momentum_schedule)``; the momentum schedule is ``None`` except for
        ``OneCycle`` with ``cycle_momentum`` (feed it to the optimizer's ``b1``).

    Raises:
        ValueError: An unknown type or parameter (the message lists the valid ones), an
            ``"auto"`` value left by a HuggingFace-style config, or an invalid value.

    Example:
        >>> import torch
        >>> lr, mom = from_deepspeed("WarmupLR", {"warmup_num_steps": 10}, base_lr=0.1)
        >>> float(lr(torch.tensor(10))), mom
        (0.10000000149011612, None)
    """
    if type not in DEEPSPEED_SCHEDULES:
        valid = ", ".join(DEEPSPEED_SCHEDULES)
        near = [t for t in DEEPSPEED_SCHEDULES if t.lower() == str(type).lower()]
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(
            f"unknown DeepSpeed scheduler type {type!r}{hint}; valid types: {valid} "
            "(torch.optim.lr_scheduler classes are not supported)"
        )
    params = dict(params)
    valid_keys = DEEPSPEED_SCHEDULES[type]
    if params.pop("last_batch_iteration", -1) != -1:
        raise ValueError(
            f"{type}: last_batch_iteration must be -1; funczero resumes a schedule from the "
            "optimizer state's count, which a checkpoint restores"
        )
    unknown = sorted(set(params) - set(valid_keys))
    if unknown:
        raise ValueError(
            f"{type}: unknown parameter(s) {unknown}; valid parameters: {', '.join(valid_keys)}"
        )
    for key, value in params.items():
        if value == "auto":
            raise ValueError(
                f"{type}: {key}='auto' is a HuggingFace Trainer placeholder; replace it with a value"
            )
    base_lr = check_float("from_deepspeed", "base_lr", base_lr, low=0.0)
    if type == "WarmupLR":
        if params.get("warmup_max_lr") is None:
            params["warmup_max_lr"] = base_lr
        return warmup_lr(**params), None
    if type == "WarmupDecayLR":
        return warmup_decay_lr(**_required(type, params, "total_num_steps")), None
    if type == "WarmupCosineLR":
        return warmup_cosine_lr(base_lr=base_lr, **_required(type, params, "total_num_steps")), None
    if type == "OneCycle":
        return one_cycle(**_required(type, params, "cycle_min_lr", "cycle_max_lr"))
    return lr_range_test(**params), None


def _required(type_: str, params: dict[str, Any], *names: str) -> dict[str, Any]:
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"{type_}: missing required parameter(s) {missing}")
    return params
