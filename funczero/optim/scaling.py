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

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funczero.optim._common import check_hparam, keys_of, require_params, zero_count
from funczero.optim.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ReduceFn,
    ScalarOrSchedule,
    Schedule,
    Updates,
)
from funczero.optim.masks import DecayMask, WeightDecayMask, decay_mask

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


# torch._foreach_mul_ rounds a Python scalar to bf16/fp16 before multiplying (u * s does not), so
# the foreach form is used only where it gives the same bits.
_FOREACH_EXACT = (torch.float32, torch.float64)


def _scale_(updates: Updates, factor: float | Tensor) -> None:
    """:func:`_scaled` written into the updates (bit for bit the same products)."""
    us = list(updates.values())
    if not us:
        return
    if not isinstance(factor, Tensor):
        if all(u.dtype in _FOREACH_EXACT for u in us):
            torch._foreach_mul_(us, factor)
        else:
            for u in us:
                u.mul_(factor)
        return
    first = us[0]
    if first.dtype in _FOREACH_EXACT and all(
        u.dtype == first.dtype and u.device == first.device for u in us
    ):
        torch._foreach_mul_(us, factor.to(device=first.device, dtype=first.dtype))
        return
    for u in us:
        u.mul_(factor.to(device=u.device, dtype=u.dtype))


def _advance(count: Tensor, found_inf: Tensor | None) -> Tensor:
    """``count + 1``, or ``count`` when the step is skipped (``found_inf == 1``), without a sync."""
    if found_inf is None:
        return count + 1
    return count + (found_inf.to(count.device) == 0).to(count.dtype)


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

    def transform_(
        updates: Updates,
        state: OptState,
        params: Params | None = None,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        del params, found_inf, reduce_fn
        _scale_(updates, step_size)
        return state

    return GradientTransformation(init_fn, update_fn, transform_=transform_)


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

    def transform_(
        updates: Updates,
        state: OptState,
        params: Params | None = None,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        del params, reduce_fn
        _scale_(updates, step_size_fn(state.count))
        return ScaleByScheduleState(count=_advance(state.count, found_inf))

    return GradientTransformation(init_fn, update_fn, transform_=transform_)


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


def add_decayed_weights(
    weight_decay: float | Tensor = 0.0,
    *,
    mask: WeightDecayMask | DecayMask | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates of the parameters that ``mask`` selects.

    Placed *before* a scaler (``chain(add_decayed_weights(wd), scale_by_adam())``) this is L2
    regularisation as in ``torch.optim.Adam(weight_decay=...)``; placed *after* it and before
    :func:`scale_by_learning_rate` it is decoupled decay as in ``torch.optim.AdamW``
    (``param *= 1 - lr * wd``). A float ``0.0`` skips the work entirely. Zero padding in sharded
    parameters stays zero.

    The in-place ``transform_`` adds ``wd * p`` with one fused multiply-add per element (no
    temporaries for a float ``weight_decay``), so it agrees with ``update`` to rounding.

    Args:
        weight_decay: Non-negative float or 0-d tensor.
        mask: Which parameters are decayed (:mod:`funczero.optim.masks`): a predicate
            ``(name, global_shape) -> bool`` such as
            :func:`~funczero.optim.no_decay_for_norms_and_biases`, a set of names, or a dict
            ``{name: bool}``; ``None`` decays every parameter.
        shapes: Global parameter shapes for a predicate ``mask`` when the optimizer holds ZeRO
            shards (``plan.spec.shapes``); ``None`` uses the tensors' own shapes.

    Returns:
        A stateless transform that needs ``params``.

    Example:
        >>> import torch
        >>> tx = add_decayed_weights(0.1, mask={"w"})
        >>> p = {"w": torch.full((1,), 2.0), "b": torch.full((1,), 2.0)}
        >>> out = tx.update({"w": torch.zeros(1), "b": torch.zeros(1)}, tx.init(p), p)[0]
        >>> out["w"], out["b"]
        (tensor([0.2000]), tensor([0.]))
    """
    weight_decay = check_hparam("add_decayed_weights", "weight_decay", weight_decay, low=0.0)
    if callable(weight_decay):
        raise TypeError("add_decayed_weights: weight_decay must be a float or a 0-d tensor")
    decays = decay_mask("add_decayed_weights", mask, shapes)
    skip_all = isinstance(weight_decay, float) and weight_decay == 0.0

    def init_fn(params: Params) -> EmptyState:
        if decays is not None:
            decays.check(params)
        return EmptyState()

    def decayed(updates: Updates, params: Params) -> list[str]:
        if decays is None:
            return list(updates)
        return [k for k in updates if decays(k, params[k])]

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del extra
        if skip_all:
            return updates, state
        params = require_params(params, "add_decayed_weights")
        wd = weight_decay
        out = dict(updates)
        for k in decayed(updates, params):
            u, p = updates[k], params[k]
            w = wd.to(device=p.device, dtype=p.dtype) if isinstance(wd, Tensor) else wd
            out[k] = u + w * p
        return out, state

    def transform_(
        updates: Updates,
        state: OptState,
        params: Params | None = None,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        del found_inf, reduce_fn
        if skip_all:
            return state
        params = require_params(params, "add_decayed_weights")
        keys = decayed(updates, params)
        us, ps = [updates[k] for k in keys], keys_of(params, keys)
        if isinstance(weight_decay, Tensor):
            for u, p in zip(us, ps):
                u.add_(weight_decay.to(device=p.device, dtype=p.dtype) * p)
        elif us:
            torch._foreach_add_(us, ps, alpha=weight_decay)
        return state

    return GradientTransformation(init_fn, update_fn, transform_=transform_)
