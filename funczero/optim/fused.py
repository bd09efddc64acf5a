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
* Everything else (Lion, LAMB, bf16 parameters with fp32 moments, scheduled ``b1``, other devices,
  torch without the op) runs :func:`inplace_update`: the pure update, then ``torch._foreach_copy_``
  into the donated buffers, so it agrees with ``update`` bit for bit.

``found_inf`` (float32 0-d, 0. or 1.) skips the step without a host sync: the fused kernels take it
and leave everything untouched; the fallback selects old values with ``torch.where``; ``count``
advances by ``found_inf == 0``. Note the fused kernels never advance their ``state_steps`` tensor:
we pass a fresh ``count + 1`` and manage ``count`` ourselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from funczero.optim._common import advance_counts, find_state, keys_of
from funczero.optim.base import (
    GradientTransformation,
    InPlaceUpdateFn,
    OptState,
    Params,
    ReduceFn,
    ScalarOrSchedule,
    Updates,
    apply_updates,
)
from funczero.optim.moments import ScaleByAdamState, ScaleByRssState, TraceState
from funczero.optim.scaling import ScaleByScheduleState

__all__ = ["adagrad_update_", "adam_update_", "inplace_update", "sgd_update_"]


def _fused_devices() -> frozenset[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return frozenset(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError):  # older torch: CUDA is the one device with fused Adam
        return frozenset({"cuda"})


_FUSED_DEVICES = _fused_devices()
# torch implements the fused Adagrad kernel for CPU only.
_FUSED_ADAGRAD_DEVICES = frozenset({"cpu"})


def _copy_(dst: list[Tensor], src: list[Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover - torch < 2.1
        for d, s in zip(dst, src):
            d.copy_(s)


def _commit_(dst: list[Tensor], src: list[Tensor], found_inf: Tensor | None) -> None:
    """Copy ``src`` into ``dst`` in place; with ``found_inf == 1`` leave ``dst`` bit-identical."""
    pairs = [(d, s) for d, s in zip(dst, src) if d is not s]
    if not pairs:
        return
    if found_inf is None:
        _copy_([d for d, _ in pairs], [s for _, s in pairs])
        return
    # where() keeps the old bits exactly (arithmetic masking would turn 0 * inf into nan and
    # -0.0 into +0.0); one temporary per tensor is the price of the generic path.
    skip = found_inf.to(torch.bool)
    for d, s in pairs:
        d.copy_(torch.where(skip.to(d.device), d, s))


def inplace_update(tx: GradientTransformation) -> InPlaceUpdateFn:
    """Build an in-place step from any transform: pure update, then copy into the buffers.

    The result agrees with ``apply_updates(params, tx.update(grads, state, params)[0])`` bit for
    bit, and honours ``found_inf`` exactly (float leaves are kept with ``torch.where``, integer
    leaves such as ``count`` keep their old value). It is the fallback behind every alias's
    ``update_`` and makes any ``chain(...)`` usable where an :class:`~funczero.optim.Optimizer`'s
    ``update_`` is expected.

    Args:
        tx: The transform.

    Returns:
        ``update_(grads, state, params, *, found_inf=None, reduce_fn=None) -> new_state``.

    Example:
        >>> import torch
        >>> from funczero import optim
        >>> tx = optim.chain(optim.clip_by_global_norm(1.0), optim.scale(-0.5))
        >>> params = {"w": torch.zeros(2)}
        >>> state = inplace_update(tx)({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> params["w"]
        tensor([-0.3000, -0.4000])
    """

    def update_(
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        updates, new_state = tx.update(grads, state, params, reduce_fn=reduce_fn)
        new_params = apply_updates({k: params[k] for k in updates}, updates)
        keys = list(new_params)
        _commit_(keys_of(params, keys), [new_params[k] for k in keys], found_inf)

        old_leaves, spec = optree.tree_flatten(state)
        new_leaves, new_spec = optree.tree_flatten(new_state)
        if new_spec != spec:
            raise ValueError(f"update changed the state's structure: {spec} -> {new_spec}")
        out: list[Any] = []
        dst, src = [], []
        for old, new in zip(old_leaves, new_leaves):
            if isinstance(old, Tensor) and old.is_floating_point():
                dst.append(old)
                src.append(new)
                out.append(old)
            elif isinstance(new, Tensor) and found_inf is not None:  # count and other integers
                out.append(torch.where(found_inf.to(new.device) != 0, old, new))
            else:
                out.append(new)
        _commit_(dst, src, found_inf)
        return optree.tree_unflatten(spec, out)

    return update_


# --------------------------------------------------------------------------- fused kernels


def _kernel(name: str) -> Callable[..., None] | None:
    return getattr(torch, name, None)


def _groups(
    params: Params,
    grads: Updates,
    states: Sequence[Params],
    devices: frozenset[str],
) -> list[tuple[list[Tensor], list[Tensor], list[list[Tensor]]]] | None:
    """Group tensors by (device, dtype) for a fused kernel, or ``None`` if any cannot be fused."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list, list, list[list]]] = {}
    for k, g in grads.items():
        p = params[k]
        moments = [keys_of(s, [k])[0] for s in states]
        if (
            p.device.type not in devices
            or p.dtype not in (torch.float32, torch.float64)
            or not p.is_contiguous()
            or any(m.dtype != p.dtype or m.device != p.device or not m.is_contiguous() for m in moments)
        ):
            return None
        ps, gs, ms = groups.setdefault((p.device, p.dtype), ([], [], [[] for _ in states]))
        ps.append(p)
        gs.append(g.to(device=p.device, dtype=p.dtype).contiguous())
        for lst, m in zip(ms, moments):
            lst.append(m)
    return list(groups.values())


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
        groups = None
        if kernel is not None and isinstance(b1, float):
            groups = _groups(params, grads, [adam.mu, adam.nu], _FUSED_DEVICES)
        if groups is None:
            return fallback(grads, state, params, found_inf=found_inf, reduce_fn=reduce_fn)
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
