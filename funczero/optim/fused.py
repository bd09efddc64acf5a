"""In-place optimizer steps: torch's fused kernels, with an exact generic fallback.

The pure ``update`` allocates new parameter and moment tensors every step; at 91M parameters that
costs page faults and is 3-4x slower than ``torch._fused_adamw_`` mutating buffers in place (see
``docs/optimizers.md``). ``Optimizer.update_`` takes the parameters and state as *donated*: it
mutates them and returns the new state (same moment tensors, new ``count``).

Dispatch, per alias:

* Adam/AdamW/SGD/Adagrad use ``torch._fused_adam_`` / ``_fused_adamw_`` / ``_fused_sgd_`` /
  ``_fused_adagrad_`` when the op exists in this torch, the device type supports it, every tensor
  is contiguous and the moments have the parameter's dtype (fp32 or fp64 parameters; the kernels
  need one dtype per list), and the hyperparameters are host floats where the kernel needs them
  (``b1`` not scheduled; SGD without dampening).
* Lion, LAMB, and Adam/AdamW that cannot use the kernel (scheduled ``b1``, bf16 parameters with
  fp32 moments, other devices, torch without the op) run in-place ``torch._foreach_*`` steps
  (:mod:`funczero.optim._foreach`), equal to the pure path up to rounding.
* Anything else, and any step given ``found_inf`` that has no kernel, runs
  :func:`~funczero.optim.inplace_update`: the pure update, then a copy into the donated buffers.

``found_inf`` (float32 0-d, 0. or 1.) skips the step without a host sync: the fused kernels take it
and leave everything untouched; the fallback selects old values with ``torch.where``; ``count``
advances by ``found_inf == 0``. Note the fused kernels never advance their ``state_steps`` tensor:
we pass a fresh ``count + 1`` and manage ``count`` ourselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from funczero.optim import _foreach
from funczero.optim._common import advance_counts, check_keys, find_state, keys_of, resolve
from funczero.optim.base import (
    GradientTransformation,
    InPlaceUpdateFn,
    OptState,
    Params,
    ReduceFn,
    ScalarOrSchedule,
    Updates,
)
from funczero.optim.inplace import inplace_update
from funczero.optim.moments import ScaleByAdamState, ScaleByLionState, ScaleByRssState, TraceState
from funczero.optim.scaling import ScaleByScheduleState

__all__ = [
    "adagrad_update_",
    "adam_update_",
    "current_lr",
    "lamb_update_",
    "lion_update_",
    "sgd_update_",
]


def _fused_devices() -> frozenset[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return frozenset(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError):  # older torch: CUDA is the one device with fused Adam
        return frozenset({"cuda"})


_FUSED_DEVICES = _fused_devices()
_FUSED_DTYPES = (torch.float32, torch.float64)  # moments are at least fp32, and must match
# torch implements the fused Adagrad kernel for CPU only.
_FUSED_ADAGRAD_DEVICES = frozenset({"cpu"})


def _kernel(name: str) -> Callable[..., None] | None:
    return getattr(torch, name, None)


def _groups(
    params: Params,
    grads: Updates,
    states: Sequence[Params],
    devices: frozenset[str],
) -> list[tuple[list[Tensor], list[Tensor], list[list[Tensor]]]] | None:
    """Group tensors by (device, dtype) for a fused kernel, or ``None`` if any cannot be fused.

    Runs every step, so it avoids dispatcher calls on the common path (grads already matching).
    """
    groups: dict[tuple[torch.device, torch.dtype], tuple[list, list, list[list]]] = {}
    for k, g in grads.items():
        p = params[k]
        moments = _keys_of_each(states, k)
        dtype, device = p.dtype, p.device
        if (
            device.type not in devices
            or dtype not in _FUSED_DTYPES
            or not p.is_contiguous()
            or any(m.dtype != dtype or m.device != device or not m.is_contiguous() for m in moments)
        ):
            return None
        if g.dtype != dtype or g.device != device:
            g = g.to(device=device, dtype=dtype)
        if not g.is_contiguous():  # the kernels index raw storage: strides must match
            g = g.contiguous()
        ps, gs, ms = groups.setdefault((device, dtype), ([], [], [[] for _ in states]))
        ps.append(p)
        gs.append(g)
        for lst, m in zip(ms, moments):
            lst.append(m)
    return list(groups.values())


def _keys_of_each(states: Sequence[Params], key: str) -> list[Tensor]:
    """``[s[key] for s in states]`` with the error of :func:`keys_of` for a missing key."""
    try:
        return [s[key] for s in states]
    except KeyError:
        return [keys_of(s, [key])[0] for s in states]


def _on(x: float | Tensor | None, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, Tensor) else x


def current_lr(learning_rate: ScalarOrSchedule, state: OptState) -> float | Tensor:
    """The learning rate for the next update: schedules read the chain's ScaleByScheduleState."""
    if callable(learning_rate):
        sched = find_state(state, ScaleByScheduleState)
        if sched is None:
            raise ValueError("the learning rate is a schedule but the state has no schedule count")
        return learning_rate(sched.count)
    return learning_rate


def adam_update_(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> InPlaceUpdateFn:
    """In-place Adam (L2 decay, ``torch._fused_adam_``) or AdamW (``torch._fused_adamw_``)."""
    fallback = inplace_update(tx)
    kernel = _kernel("_fused_adamw_" if decoupled else "_fused_adam_")

    def update_(
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        adam = find_state(state, ScaleByAdamState)
        check_keys("update_", grads, adam.mu)
        groups = None
        if kernel is not None and isinstance(b1, float):
            groups = _groups(params, grads, [adam.mu, adam.nu], _FUSED_DEVICES)
        if groups is None:
            if found_inf is not None:
                return fallback(grads, state, params, found_inf=found_inf, reduce_fn=reduce_fn)
            _foreach.adam_step_(
                grads, params, adam, learning_rate=current_lr(learning_rate, state), b1=b1,
                b2=b2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
            )  # fmt: skip
            return advance_counts(state, None)
        lr = current_lr(learning_rate, state)
        step = (adam.count + 1).to(torch.float32)
        for ps, gs, (ms, vs) in groups:
            dev = ps[0].device
            step_d = step.to(dev)
            kernel(
                ps, gs, ms, vs, [], [step_d] * len(ps),
                lr=_on(lr, dev), beta1=b1, beta2=b2, weight_decay=weight_decay, eps=eps,
                amsgrad=False, maximize=False, grad_scale=None, found_inf=_on(found_inf, dev),
            )  # fmt: skip
        return advance_counts(state, found_inf)

    return update_


def sgd_update_(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> InPlaceUpdateFn:
    """In-place SGD with ``torch._fused_sgd_``.

    The kernel's ``is_first_step`` is a host bool; we always pass ``False``: with zero-initialised
    buffers the first step computes ``momentum * 0 + (1 - dampening) * g``, which is torch's
    ``buf = g`` when ``dampening == 0``. Dampened SGD takes the (exact) generic path instead.
    """
    fallback = inplace_update(tx)
    kernel = _kernel("_fused_sgd_")

    def update_(
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        check_keys("update_", grads, params)
        groups = None
        if kernel is not None and dampening == 0.0:
            traced = find_state(state, TraceState) if momentum != 0.0 else None
            moments = [traced.trace] if traced is not None else []
            groups = _groups(params, grads, moments, _FUSED_DEVICES)
        if groups is None:
            return fallback(grads, state, params, found_inf=found_inf, reduce_fn=reduce_fn)
        lr = current_lr(learning_rate, state)
        for ps, gs, bufs in groups:
            dev = ps[0].device
            kernel(
                ps, gs, bufs[0] if bufs else [],
                weight_decay=weight_decay, momentum=momentum, lr=_on(lr, dev), dampening=0.0,
                nesterov=nesterov, maximize=False, is_first_step=False, grad_scale=None,
                found_inf=_on(found_inf, dev),
            )  # fmt: skip
        return advance_counts(state, found_inf)

    return update_


def adagrad_update_(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    lr_decay: float,
    weight_decay: float,
    eps: float,
) -> InPlaceUpdateFn:
    """In-place Adagrad with ``torch._fused_adagrad_`` (CPU).

    ``learning_rate`` is the *base* rate: the kernel applies ``lr / (1 + (step - 1) * lr_decay)``
    itself with ``step = count + 1``.
    """
    fallback = inplace_update(tx)
    kernel = _kernel("_fused_adagrad_")

    def update_(
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        rss = find_state(state, ScaleByRssState)
        check_keys("update_", grads, rss.sum_of_squares)
        groups = None
        if kernel is not None:
            groups = _groups(params, grads, [rss.sum_of_squares], _FUSED_ADAGRAD_DEVICES)
        if groups is None:
            return fallback(grads, state, params, found_inf=found_inf, reduce_fn=reduce_fn)
        sched = find_state(state, ScaleByScheduleState)
        # Without a schedule state the rate is constant and lr_decay is 0: the step is irrelevant.
        count = sched.count if sched is not None else None
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        for ps, gs, (ss,) in groups:
            dev = ps[0].device
            if count is None:
                step = torch.ones((), dtype=torch.float32, device=dev)
            else:
                step = (count + 1).to(device=dev, dtype=torch.float32)
            kernel(
                ps, gs, ss, [step] * len(ps),
                lr=_on(lr, dev), lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                maximize=False, grad_scale=None, found_inf=_on(found_inf, dev),
            )  # fmt: skip
        return advance_counts(state, found_inf)

    return update_


def lamb_update_(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule,
    b2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    min_coeff: float,
    max_coeff: float,
) -> InPlaceUpdateFn:
    """In-place LAMB with ``torch._foreach_*`` ops (torch has no fused LAMB kernel)."""
    fallback = inplace_update(tx)

    def update_(
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        if found_inf is not None:
            return fallback(grads, state, params, found_inf=found_inf, reduce_fn=reduce_fn)
        adam = find_state(state, ScaleByAdamState)
        check_keys("update_", grads, adam.mu)
        _foreach.adam_step_(
            grads, params, adam,
            learning_rate=current_lr(learning_rate, state), b1=b1, b2=b2, eps=eps,
            weight_decay=weight_decay, decoupled=True, bias_correction=bias_correction,
            trust_ratio=(min_coeff, max_coeff), reduce_fn=reduce_fn,
        )  # fmt: skip
        return advance_counts(state, None)

    return update_


def lion_update_(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule,
    b2: float,
    weight_decay: float,
) -> InPlaceUpdateFn:
    """In-place Lion with ``torch._foreach_*`` ops (torch has no fused Lion kernel)."""
    fallback = inplace_update(tx)

    def update_(
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        if found_inf is not None:
            return fallback(grads, state, params, found_inf=found_inf, reduce_fn=reduce_fn)
        lion = find_state(state, ScaleByLionState)
        check_keys("update_", grads, lion.mu)
        _foreach.lion_step_(
            grads, params, lion.mu, learning_rate=current_lr(learning_rate, state),
            b1=resolve(b1, lion.count), b2=b2, weight_decay=weight_decay,
        )  # fmt: skip
        return advance_counts(state, None)

    return update_
