r"""DeepSpeed's LR schedules as pure schedules of the applied-update count.

Step origin (the one thing to get right). DeepSpeed's scheduler objects keep
``last_batch_iteration`` (``it``), starting at -1; the constructor writes the ``it = -1`` rate into
the optimizer, and the engine calls ``scheduler.step()`` (``it += 1``) once after every *applied*
optimizer step (not after a step skipped for fp16 overflow). So DeepSpeed's optimizer step number
``s`` (1-based) runs with the rate of ``it = s - 2``. Our ``count`` is the number of applied updates
before this one (``s = count + 1``), so every schedule here is

.. math::
    \mathrm{lr}(\mathrm{count}) = \mathrm{lr}_{DS}(it = \mathrm{count} - 1).

Consequences, reproduced on purpose:

* ``WarmupLR``/``WarmupDecayLR``: counts 0 and 1 both train at ``warmup_min_lr`` (``it = -1`` is the
  constructor's value, ``it = 0`` gives ``log(1) = 0``).
* ``WarmupCosineLR``: the ratio at ``it < 0`` is 0, so **the first update trains at lr 0**.
* ``OneCycle``: the constructor sets momentum to ``cycle_min_mom``, while ``it = 0`` gives almost
  ``cycle_max_mom``; the first update therefore uses ``cycle_min_mom``.

Deliberate differences, each an error where DeepSpeed is silent:

* OneCycle also overwrites Adam's ``beta2`` with 0.99 (``betas = (mom, 0.99)``). We do **not**: the
  momentum schedule drives ``b1`` only and ``b2`` stays what you configured. Pass ``b2=0.99`` to
  reproduce DeepSpeed exactly.
* An unknown ``warmup_type`` raises ``ValueError`` (DeepSpeed logs a warning and uses ``"log"``).
* Per-parameter-group lists of values are rejected (funczero has no param groups).

Example:
    >>> import torch
    >>> lr = warmup_lr(warmup_max_lr=1.0, warmup_num_steps=4, warmup_type="linear")
    >>> [float(lr(torch.tensor(c))) for c in range(7)]
    [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from funczero.optim._common import check_float, scalar_dtype
from funczero.optim.base import Schedule

__all__ = [
    "DEEPSPEED_SCHEDULES",
    "lr_range_test",
    "one_cycle",
    "warmup_cosine_lr",
    "warmup_decay_lr",
    "warmup_lr",
]

_WARMUP_TYPES = ("log", "linear")


def _iteration(count: Tensor | int) -> Tensor:
    """DeepSpeed's ``last_batch_iteration`` for the update that sees ``count`` (float64)."""
    count = torch.as_tensor(count)
    return count.to(scalar_dtype(count.device)) - 1.0


def _out(x: Tensor) -> Tensor:
    return x.to(torch.float32)


def _positive_int(who: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{who}: {name}={value!r} must be a positive integer (a number of steps)")
    return value


def _number(who: str, name: str, value: Any, *, low: float | None = None) -> float:
    if isinstance(value, (list, tuple)):
        raise ValueError(  # noqa: TRY004 - a config mistake; from_deepspeed raises ValueError
            f"{who}: {name}={value!r} is a per-param-group list; funczero has no param groups, "
            "pass a single number"
        )
    return check_float(who, name, value, low=low)


def _warmup_type(who: str, value: Any) -> str:
    if value not in _WARMUP_TYPES:
        raise ValueError(
            f"{who}: warmup_type={value!r} is not one of {list(_WARMUP_TYPES)} (DeepSpeed would "
            "silently fall back to 'log')"
        )
    return value


def _warmup_gamma(it: Tensor, warmup_num_steps: int, warmup_type: str) -> Tensor:
    """DeepSpeed's warmup fraction for ``0 <= it < W``: ``ln(it+1)/ln(W)`` or ``it/W``."""
    if warmup_type == "log":
        # clamp keeps log finite for it < 0, a branch every caller masks with where().
        return torch.log(torch.clamp(it + 1.0, min=1.0)) / math.log(warmup_num_steps)
    return it / warmup_num_steps


def warmup_lr(
    *,
    warmup_max_lr: float,
    warmup_min_lr: float = 0.0,
    warmup_num_steps: int = 1000,
    warmup_type: str = "log",
) -> Schedule:
    """DeepSpeed ``WarmupLR``: warm up from ``warmup_min_lr`` to ``warmup_max_lr``, then hold.

    With ``W = max(2, warmup_num_steps)`` and ``it = count - 1``: ``lr = min + (max - min) * g``
    where ``g = 0`` for ``it < 0``, ``ln(it + 1) / ln(W)`` (log) or ``it / W`` (linear) for
    ``it < W``, and 1 after. Log warmup peaks at ``count = W``, linear at ``count = W + 1``.
    (DeepSpeed's default ``warmup_max_lr`` is the optimizer's lr: :func:`from_deepspeed` fills it.)

    Example:
        >>> import torch
        >>> lr = warmup_lr(warmup_max_lr=1.0, warmup_num_steps=4)
        >>> [round(float(lr(torch.tensor(c))), 4) for c in range(6)]
        [0.0, 0.0, 0.5, 0.7925, 1.0, 1.0]
    """
    who = "warmup_lr"
    lo = _number(who, "warmup_min_lr", warmup_min_lr)
    hi = _number(who, "warmup_max_lr", warmup_max_lr)
    steps = max(2, _positive_int(who, "warmup_num_steps", warmup_num_steps))
    kind = _warmup_type(who, warmup_type)

    def schedule(count: Tensor) -> Tensor:
        it = _iteration(count)
        gamma = torch.where(it < steps, _warmup_gamma(it, steps, kind), 1.0)
        gamma = torch.where(it < 0, 0.0, gamma)
        return _out(lo + (hi - lo) * gamma)

    return schedule


def warmup_decay_lr(
    *,
    total_num_steps: int,
    warmup_min_lr: float = 0.0,
    warmup_max_lr: float = 0.001,
    warmup_num_steps: int = 1000,
    warmup_type: str = "log",
) -> Schedule:
    """DeepSpeed ``WarmupDecayLR``: :func:`warmup_lr`, then linear decay to 0 at ``total_num_steps``.

    After warmup ``g = max(0, (T - it) / max(1, T - W))``, so the rate reaches 0 at
    ``it = T`` (``count = T + 1``). Note DeepSpeed's default ``warmup_max_lr`` here is 0.001, not
    the optimizer's lr.

    Example:
        >>> import torch
        >>> lr = warmup_decay_lr(total_num_steps=6, warmup_max_lr=1.0, warmup_num_steps=2,
        ...                      warmup_type="linear")
        >>> [float(lr(torch.tensor(c))) for c in range(9)]
        [0.0, 0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    who = "warmup_decay_lr"
    total = _positive_int(who, "total_num_steps", total_num_steps)
    lo = _number(who, "warmup_min_lr", warmup_min_lr)
    hi = _number(who, "warmup_max_lr", warmup_max_lr)
    steps = max(2, _positive_int(who, "warmup_num_steps", warmup_num_steps))
    kind = _warmup_type(who, warmup_type)
    decay_len = float(max(1, total - steps))

    def schedule(count: Tensor) -> Tensor:
        it = _iteration(count)
        decay = torch.clamp((total - it) / decay_len, min=0.0)
        gamma = torch.where(it < steps, _warmup_gamma(it, steps, kind), decay)
        gamma = torch.where(it < 0, 0.0, gamma)
        return _out(lo + (hi - lo) * gamma)

    return schedule


def warmup_cosine_lr(
    *,
    base_lr: float,
    total_num_steps: int,
    warmup_min_ratio: float = 0.0,
    warmup_num_steps: int = 1000,
    cos_min_ratio: float = 0.0001,
    warmup_type: str = "log",
) -> Schedule:
    """DeepSpeed ``WarmupCosineLR``: ``base_lr`` times a warmup-then-cosine ratio.

    ``ratio = 0`` for ``it < 0`` (**the first update trains at lr 0**); ``wmin + (1 - wmin) * g``
    during warmup; then ``p = min(1, (it - W + 1) / max(1, T - W))`` and
    ``ratio = max(0, cmin + (1 - cmin) * (1 + cos(pi * p)) / 2)``, which stays at ``cmin`` once
    the decay ends.

    Example:
        >>> import torch
        >>> lr = warmup_cosine_lr(base_lr=1.0, total_num_steps=4, warmup_num_steps=2,
        ...                       cos_min_ratio=0.0, warmup_type="linear")
        >>> [float(lr(torch.tensor(c))) for c in range(6)]
        [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]
    """
    who = "warmup_cosine_lr"
    base = _number(who, "base_lr", base_lr, low=0.0)
    total = _positive_int(who, "total_num_steps", total_num_steps)
    wmin = _number(who, "warmup_min_ratio", warmup_min_ratio)
    cmin = _number(who, "cos_min_ratio", cos_min_ratio)
    steps = max(2, _positive_int(who, "warmup_num_steps", warmup_num_steps))
    kind = _warmup_type(who, warmup_type)
    decay_len = float(max(1, total - steps))

    def schedule(count: Tensor) -> Tensor:
        it = _iteration(count)
        warm = wmin + (1.0 - wmin) * _warmup_gamma(it, steps, kind)
        progress = torch.clamp((it - steps + 1.0) / decay_len, max=1.0)
        cosine = torch.clamp(
            cmin + (1.0 - cmin) * (1.0 + torch.cos(math.pi * progress)) / 2, min=0.0
        )
        ratio = torch.where(it < steps, warm, cosine)
        ratio = torch.where(it < 0, 0.0, ratio)
        return _out(base * ratio)

    return schedule


def one_cycle(
    *,
    cycle_min_lr: float,
    cycle_max_lr: float,
    decay_lr_rate: float = 0.0,
    cycle_first_step_size: int = 2000,
    cycle_second_step_size: int | None = None,
    cycle_first_stair_count: int = 0,
    cycle_second_stair_count: int | None = None,
    decay_step_size: int = 0,
    cycle_momentum: bool = True,
    cycle_min_mom: float = 0.8,
    cycle_max_mom: float = 0.9,
    decay_mom_rate: float = 0.0,
) -> tuple[Schedule, Schedule | None]:
    """DeepSpeed ``OneCycle``: one triangular LR cycle (momentum inverse), then optional decay.

    With ``b = it + 1 = count``, ``N = s1 + s2`` and ``r = s1 / N``: ``x = frac(b / N)``;
    ``scale = x / r`` if ``x <= r`` else ``(x - 1) / (r - 1)``; a stair count ``k > 0`` quantises
    it to ``floor(position * k) / k`` (position from the integer offset in the cycle, as DeepSpeed
    does). While ``it < N``: ``lr = min + (max - min) * scale`` and
    ``mom = max_mom - (max_mom - min_mom) * scale``. After: ``lr = min / (1 + decay_lr_rate * j /
    decay_step_size)`` and ``mom = max_mom * (1 + decay_mom_rate * j / decay_step_size)`` with
    ``j = it - N + 1`` (no decay if the rate or ``decay_step_size`` is 0). The first update
    (``count = 0``) uses ``cycle_min_mom``: DeepSpeed's constructor value. Note a positive
    ``decay_mom_rate`` makes the momentum *grow* past ``cycle_max_mom`` (DeepSpeed's formula).

    Returns:
        ``(lr_schedule, momentum_schedule)``; the momentum schedule is ``None`` when
        ``cycle_momentum`` is false. Feed it to ``b1`` of adam/adamw/lamb/lion; ``b2`` is not
        touched (DeepSpeed forces 0.99; see the module notes).

    Example:
        >>> import torch
        >>> lr, mom = one_cycle(cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=2)
        >>> [float(lr(torch.tensor(c))) for c in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
        >>> [round(float(mom(torch.tensor(c))), 3) for c in range(6)]
        [0.8, 0.85, 0.8, 0.85, 0.9, 0.9]
    """
    who = "one_cycle"
    lo = _number(who, "cycle_min_lr", cycle_min_lr)
    hi = _number(who, "cycle_max_lr", cycle_max_lr)
    lr_rate = _number(who, "decay_lr_rate", decay_lr_rate)
    s1 = float(_positive_int(who, "cycle_first_step_size", cycle_first_step_size))
    s2 = s1
    if cycle_second_step_size is not None:
        s2 = float(_positive_int(who, "cycle_second_step_size", cycle_second_step_size))
    k1 = cycle_first_stair_count
    k2 = k1 if cycle_second_stair_count is None else cycle_second_stair_count
    for name, k in (("cycle_first_stair_count", k1), ("cycle_second_stair_count", k2)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{who}: {name}={k!r} must be an int >= 0 (0 disables stairs)")
    decay_size = _number(who, "decay_step_size", decay_step_size, low=0.0)
    mom_lo = _number(who, "cycle_min_mom", cycle_min_mom)
    mom_hi = _number(who, "cycle_max_mom", cycle_max_mom)
    mom_rate = _number(who, "decay_mom_rate", decay_mom_rate)
    total, ratio = s1 + s2, s1 / (s1 + s2)
    skip_lr_decay = decay_size == 0.0 or lr_rate == 0.0
    skip_mom_decay = decay_size == 0.0 or mom_rate == 0.0

    def scale_and_phase(count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        it = _iteration(count)
        b = it + 1.0
        x = 1.0 + b / total - torch.floor(1.0 + b / total)
        first = x <= ratio
        scale = torch.where(first, x / ratio, (x - 1.0) / (ratio - 1.0))
        if k1 > 0 or k2 > 0:
            k = torch.where(first, float(k1), float(k2))
            pos_in_cycle = torch.remainder(b, total)
            position = torch.where(
                pos_in_cycle <= s1, pos_in_cycle * k / s1, (total - pos_in_cycle) * k / s2
            )
            stairs = torch.floor(position) / torch.clamp(k, min=1.0)
            scale = torch.where(k > 0, stairs, scale)
        decay_iter = it - total + 1.0
        return scale, it < total, decay_iter

    def lr_schedule(count: Tensor) -> Tensor:
        scale, in_cycle, j = scale_and_phase(count)
        decayed = lo if skip_lr_decay else lo / (1.0 + lr_rate * j / (decay_size or 1.0))
        return _out(torch.where(in_cycle, lo + (hi - lo) * scale, decayed))

    def mom_schedule(count: Tensor) -> Tensor:
        scale, in_cycle, j = scale_and_phase(count)
        decayed = mom_hi if skip_mom_decay else mom_hi * (1.0 + mom_rate * j / (decay_size or 1.0))
        mom = torch.where(in_cycle, mom_hi - (mom_hi - mom_lo) * scale, decayed)
        # DeepSpeed's constructor writes cycle_min_mom for it = -1 (the formula would give max).
        return _out(torch.where(torch.as_tensor(count) == 0, mom_lo, mom))

    return lr_schedule, (mom_schedule if cycle_momentum else None)


def lr_range_test(
    *,
    lr_range_test_min_lr: float = 1e-3,
    lr_range_test_step_size: int = 2000,
    lr_range_test_step_rate: float = 1.0,
    lr_range_test_staircase: bool = False,
) -> Schedule:
    """DeepSpeed ``LRRangeTest``: ``lr = min_lr * (1 + rate * i)``, ``i = count / step_size``.

    (``i = (it + 1) / step_size`` in DeepSpeed's terms, floored when ``staircase``.)

    Example:
        >>> import torch
        >>> lr = lr_range_test(lr_range_test_min_lr=1.0, lr_range_test_step_size=2)
        >>> [float(lr(torch.tensor(c))) for c in range(4)]
        [1.0, 1.5, 2.0, 2.5]
    """
    who = "lr_range_test"
    lo = _number(who, "lr_range_test_min_lr", lr_range_test_min_lr)
    size = _positive_int(who, "lr_range_test_step_size", lr_range_test_step_size)
    rate = _number(who, "lr_range_test_step_rate", lr_range_test_step_rate)
    staircase = bool(lr_range_test_staircase)

    def schedule(count: Tensor) -> Tensor:
        interval = (_iteration(count) + 1.0) / size
        if staircase:
            interval = torch.floor(interval)
        return _out(lo * (1.0 + rate * interval))

    return schedule


# --------------------------------------------------------------------------- config entry point

DEEPSPEED_SCHEDULES: dict[str, tuple[str, ...]] = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "WarmupDecayLR": (
        "total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
    ),
    "WarmupCosineLR": (
        "total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
    ),
    "OneCycle": (
        "cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_first_step_size",
        "cycle_second_step_size", "cycle_first_stair_count", "cycle_second_stair_count",
        "decay_step_size", "cycle_momentum", "cycle_min_mom", "cycle_max_mom", "decay_mom_rate",
    ),
    "LRRangeTest": (
        "lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate",
        "lr_range_test_staircase",
    ),
}  # fmt: skip
"""DeepSpeed scheduler types :func:`funczero.optim.from_deepspeed` accepts, and their parameters."""
