"""Stateless and schedule-driven scaling transforms, and weight decay.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> params = {"w": torch.ones(2)}
    >>> tx = optim.chain(optim.add_decayed_weights(0.5), optim.scale_by_learning_rate(0.1))
    >>> tx.update({"w": torch.zeros(2)}, tx.init(params), params)[0]["w"]
    tensor([-0.0500, -0.0500])
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

from funczero.optim._common import check_hparam, require_params, zero_count
from funczero.optim.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Schedule,
    Updates,
)

__all__ = [
    "ScaleByScheduleState",
    "add_decayed_weights",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
]


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`.

    Attributes:
        count: int64 0-d tensor, the number of applied updates so far.
    """

    count: Tensor


def _scaled(updates: Updates, factor: float | Tensor) -> Updates:
    # A tensor factor may live on another device (a user's CPU scalar) or have another dtype
    # (float32 schedules, float64 corrections): cast it to each update's, so a 0-d update is not
    # promoted and every update is computed in its own dtype.
    if isinstance(factor, Tensor):
        return {k: u * factor.to(device=u.device, dtype=u.dtype) for k, u in updates.items()}
    return {k: u * factor for k, u in updates.items()}


def scale(step_size: float | Tensor) -> GradientTransformation:
    """Multiply updates by a constant (a float, or a 0-d tensor that may be changed in place).

    Args:
        step_size: The factor.

    Returns:
        A stateless transform.

    Example:
        >>> import torch
        >>> tx = scale(-2.0)
        >>> tx.update({"w": torch.ones(1)}, tx.init({}))[0]["w"]
        tensor([-2.])
    """
    step_size = check_hparam("scale", "step_size", step_size)
    if callable(step_size):
        raise TypeError("scale: step_size must be a float or a 0-d tensor; use scale_by_schedule")

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del params, extra
        return _scaled(updates, step_size), state

    return GradientTransformation(init_fn, update_fn)


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiply updates by ``step_size_fn(count)``; ``count`` is the number of applied updates.

    The first update sees ``count == 0``.

    Args:
        step_size_fn: A schedule (pure tensor function of the int64 count).

    Returns:
        A transform with state :class:`ScaleByScheduleState`.

    Example:
        >>> import torch
        >>> tx = scale_by_schedule(lambda c: 1.0 + c.to(torch.float32))
        >>> p = {"w": torch.ones(1)}
        >>> u, s = tx.update(p, tx.init(p))
        >>> tx.update(p, s)[0]["w"]
        tensor([2.])
    """
    if not callable(step_size_fn):
        raise TypeError("scale_by_schedule: step_size_fn must be callable; use scale() for numbers")

    def init_fn(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=zero_count(params))

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del params, extra
        factor = step_size_fn(state.count)
        return _scaled(updates, factor), ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Scale updates by the learning rate (negated by default, so updates descend).

    Args:
        learning_rate: A float, a 0-d tensor, or a schedule of the applied-update count.
        flip_sign: Multiply by ``-learning_rate`` (default) instead of ``learning_rate``.

    Returns:
        :func:`scale` for a float or tensor, :func:`scale_by_schedule` for a schedule.

    Example:
        >>> import torch
        >>> tx = scale_by_learning_rate(0.1)
        >>> tx.update({"w": torch.ones(1)}, tx.init({}))[0]["w"]
        tensor([-0.1000])
    """
    learning_rate = check_hparam("scale_by_learning_rate", "learning_rate", learning_rate, low=0.0)
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        fn = learning_rate
        return scale_by_schedule(lambda count: sign * fn(count))
    return scale(sign * learning_rate)


def add_decayed_weights(weight_decay: float | Tensor = 0.0) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates.

    Placed *before* a scaler (``chain(add_decayed_weights(wd), scale_by_adam())``) this is L2
    regularisation as in ``torch.optim.Adam(weight_decay=...)``; placed *after* it and before
    :func:`scale_by_learning_rate` it is decoupled decay as in ``torch.optim.AdamW``
    (``param *= 1 - lr * wd``). A float ``0.0`` skips the work entirely. Zero padding in sharded
    parameters stays zero.

    Args:
        weight_decay: Non-negative float or 0-d tensor.

    Returns:
        A stateless transform that needs ``params``.

    Example:
        >>> import torch
        >>> tx = add_decayed_weights(0.1)
        >>> p = {"w": torch.full((1,), 2.0)}
        >>> tx.update({"w": torch.zeros(1)}, tx.init(p), p)[0]["w"]
        tensor([0.2000])
    """
    weight_decay = check_hparam("add_decayed_weights", "weight_decay", weight_decay, low=0.0)
    if callable(weight_decay):
        raise TypeError("add_decayed_weights: weight_decay must be a float or a 0-d tensor")

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del extra
        if isinstance(weight_decay, float) and weight_decay == 0.0:
            return updates, state
        params = require_params(params, "add_decayed_weights")
        wd = weight_decay
        out = {}
        for k, u in updates.items():
            p = params[k]
            w = wd.to(device=p.device, dtype=p.dtype) if isinstance(wd, Tensor) else wd
            out[k] = u + w * p
        return out, state

    return GradientTransformation(init_fn, update_fn)
