"""In-place optimizer steps: torch's fused kernels, with an exact generic fallback.

The pure ``update`` allocates new parameter and moment tensors every step; at 91M parameters that
costs page faults and is 3-4x slower than ``torch._fused_adamw_`` mutating buffers in place (see
``docs/optimizers.md``). ``Optimizer.update_`` takes the parameters and state as *donated*: it
mutates them and returns the new state (same moment tensors, new ``count``).

Every alias's ``update_`` is one mechanism, :func:`in_place_step`, given the alias's
:class:`InPlaceRecipe` (its moments, its kernel and how to call it, its foreach step). Dispatch:

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

A weight-decay mask splits each kernel call in two groups (decay, no decay): the kernels take one
``weight_decay`` per call, as torch.optim does per parameter group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
from funczero.optim.masks import DecayMask
from funczero.optim.moments import ScaleByAdamState, ScaleByLionState, ScaleByRssState, TraceState
from funczero.optim.scaling import ScaleByScheduleState

__all__ = [
    "InPlaceRecipe",
    "KernelGroup",
    "adagrad_update_",
    "adam_update_",
    "current_lr",
    "in_place_step",
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


class KernelGroup(NamedTuple):
    """Tensors a fused kernel takes in one call: one device, one dtype, one weight decay."""

    params: list[Tensor]
    grads: list[Tensor]
    moments: list[list[Tensor]]
    weight_decay: float
    device: torch.device


RunKernel = Callable[[Callable[..., None], list[KernelGroup], OptState, Tensor | None], None]
"""``run(kernel, groups, state, found_inf)``: call ``kernel`` once per group."""
ForeachStep = Callable[[Updates, Params, OptState, ReduceFn | None], None]
"""``step(grads, params, state, reduce_fn)``: the whole step with in-place foreach ops."""


class InPlaceRecipe(NamedTuple):
    """What differs between the aliases' in-place steps; :func:`in_place_step` does the rest.

    Attributes:
        moments: ``moments(state)``: the per-parameter buffers the kernel mutates, in its
            argument order (the first one's keys are the state's parameters).
        kernel: Name of the ``torch._fused_*_`` op, or ``None`` when there is none or the
            hyperparameters rule it out (a scheduled ``b1``).
        run_kernel: Calls the kernel on every group (hyperparameters bound).
        foreach: The in-place foreach step used when the kernel cannot run and no step may be
            skipped, or ``None`` (then the generic path runs).
        devices: Device types the kernel supports.
    """

    moments: Callable[[OptState], list[Params]]
    kernel: str | None = None
    run_kernel: RunKernel | None = None
    foreach: ForeachStep | None = None
    devices: frozenset[str] = _FUSED_DEVICES


def _groups(
    params: Params,
    grads: Updates,
    states: Sequence[Params],
    devices: frozenset[str],
    weight_decay: float,
    mask: DecayMask | None,
) -> list[KernelGroup] | None:
    """Group tensors by (device, dtype, decay) for a fused kernel, or ``None`` if any cannot be.

    Runs every step, so it avoids dispatcher calls on the common path (grads already matching).
    """
    groups: dict[tuple[torch.device, torch.dtype, float], KernelGroup] = {}
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
        wd = weight_decay if mask is None or mask(k, p) else 0.0
        group = groups.get((device, dtype, wd))
        if group is None:
            group = KernelGroup([], [], [[] for _ in states], wd, device)
            groups[(device, dtype, wd)] = group
        group.params.append(p)
        group.grads.append(g)
        for lst, m in zip(group.moments, moments):
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


def in_place_step(
    tx: GradientTransformation,
    recipe: InPlaceRecipe,
    *,
    name: str,
    weight_decay: float = 0.0,
    mask: DecayMask | None = None,
) -> InPlaceUpdateFn:
    """The in-place step of an alias: fused kernel, else foreach step, else the generic path.

    Args:
        tx: The alias's pure chain (the generic path runs it, then copies into the buffers).
        recipe: The alias's kernel and foreach step.
        name: The alias (names the step in error messages and tracebacks).
        weight_decay: The alias's decay; parameters that ``mask`` excludes get 0 instead.
        mask: The alias's weight-decay mask, or ``None``.

    Returns:
        ``update_(grads, state, params, *, found_inf=None, reduce_fn=None) -> new_state``.
    """
    fallback = inplace_update(tx)
    kernel = _kernel(recipe.kernel) if recipe.kernel is not None else None

    def update_(
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        moments = recipe.moments(state)
        check_keys("update_", grads, moments[0] if moments else params)
        if kernel is not None and recipe.run_kernel is not None:
            groups = _groups(params, grads, moments, recipe.devices, weight_decay, mask)
            if groups is not None:
                recipe.run_kernel(kernel, groups, state, found_inf)
                return advance_counts(state, found_inf)
        # The foreach steps cannot skip a step; the generic path selects old values instead.
        if recipe.foreach is not None and found_inf is None:
            recipe.foreach(grads, params, state, reduce_fn)
            return advance_counts(state, None)
        return fallback(grads, state, params, found_inf=found_inf, reduce_fn=reduce_fn)

    # Error messages (optim.in_place_unsupported_reason) and tracebacks name the alias.
    update_.__qualname__ = f"{name}.<locals>.update_"
    return update_


def _adam_moments(state: OptState) -> list[Params]:
    adam = find_state(state, ScaleByAdamState)
    return [adam.mu, adam.nu]


def _adam_foreach(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    mask: DecayMask | None,
    **lamb: Any,
) -> ForeachStep:
    """The foreach step of Adam, AdamW and (with ``lamb``'s trust-ratio arguments) LAMB."""

    def step(grads: Updates, params: Params, state: OptState, reduce_fn: ReduceFn | None) -> None:
        # Looked up at call time (not bound at import) so tests can observe the foreach path.
        _foreach.adam_step_(
            grads, params, find_state(state, ScaleByAdamState),
            learning_rate=current_lr(learning_rate, state), b1=b1, b2=b2, eps=eps,
            weight_decay=weight_decay, decoupled=decoupled, mask=mask, reduce_fn=reduce_fn, **lamb,
        )  # fmt: skip

    return step


def adam_update_(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    mask: DecayMask | None = None,
) -> InPlaceUpdateFn:
    """In-place Adam (L2 decay, ``torch._fused_adam_``) or AdamW (``torch._fused_adamw_``)."""

    def run_kernel(kernel: Callable[..., None], groups: list[KernelGroup], state: OptState,
                   found_inf: Tensor | None) -> None:  # fmt: skip
        lr = current_lr(learning_rate, state)
        step = (find_state(state, ScaleByAdamState).count + 1).to(torch.float32)
        for g in groups:
            mu, nu = g.moments
            kernel(
                g.params, g.grads, mu, nu, [], [step.to(g.device)] * len(g.params),
                lr=_on(lr, g.device), beta1=b1, beta2=b2, weight_decay=g.weight_decay, eps=eps,
                amsgrad=False, maximize=False, grad_scale=None, found_inf=_on(found_inf, g.device),
            )  # fmt: skip

    kernel = "_fused_adamw_" if decoupled else "_fused_adam_"
    recipe = InPlaceRecipe(
        moments=_adam_moments,
        kernel=kernel if isinstance(b1, float) else None,  # the kernel takes a host-float beta1
        run_kernel=run_kernel,
        foreach=_adam_foreach(learning_rate, b1, b2, eps, weight_decay, decoupled, mask),
    )
    name = "adamw" if decoupled else "adam"
    return in_place_step(tx, recipe, name=name, weight_decay=weight_decay, mask=mask)


def sgd_update_(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    mask: DecayMask | None = None,
) -> InPlaceUpdateFn:
    """In-place SGD with ``torch._fused_sgd_``.

    The kernel's ``is_first_step`` is a host bool; we always pass ``False``: with zero-initialised
    buffers the first step computes ``momentum * 0 + (1 - dampening) * g``, which is torch's
    ``buf = g`` when ``dampening == 0``. Dampened SGD takes the (exact) generic path instead.
    """

    def moments(state: OptState) -> list[Params]:
        traced = find_state(state, TraceState) if momentum != 0.0 else None
        return [traced.trace] if traced is not None else []

    def run_kernel(kernel: Callable[..., None], groups: list[KernelGroup], state: OptState,
                   found_inf: Tensor | None) -> None:  # fmt: skip
        lr = current_lr(learning_rate, state)
        for g in groups:
            kernel(
                g.params, g.grads, g.moments[0] if g.moments else [],
                weight_decay=g.weight_decay, momentum=momentum, lr=_on(lr, g.device),
                dampening=0.0, nesterov=nesterov, maximize=False, is_first_step=False,
                grad_scale=None, found_inf=_on(found_inf, g.device),
            )  # fmt: skip

    recipe = InPlaceRecipe(
        moments=moments,
        kernel="_fused_sgd_" if dampening == 0.0 else None,
        run_kernel=run_kernel,
    )
    return in_place_step(tx, recipe, name="sgd", weight_decay=weight_decay, mask=mask)


def adagrad_update_(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    mask: DecayMask | None = None,
) -> InPlaceUpdateFn:
    """In-place Adagrad with ``torch._fused_adagrad_`` (CPU).

    ``learning_rate`` is the *base* rate: the kernel applies ``lr / (1 + (step - 1) * lr_decay)``
    itself with ``step = count + 1``.
    """

    def moments(state: OptState) -> list[Params]:
        return [find_state(state, ScaleByRssState).sum_of_squares]

    def run_kernel(kernel: Callable[..., None], groups: list[KernelGroup], state: OptState,
                   found_inf: Tensor | None) -> None:  # fmt: skip
        sched = find_state(state, ScaleByScheduleState)
        # Without a schedule state the rate is constant and lr_decay is 0: the step is irrelevant.
        count = sched.count if sched is not None else None
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        for g in groups:
            if count is None:
                step = torch.ones((), dtype=torch.float32, device=g.device)
            else:
                step = (count + 1).to(device=g.device, dtype=torch.float32)
            (sums,) = g.moments
            kernel(
                g.params, g.grads, sums, [step] * len(g.params),
                lr=_on(lr, g.device), lr_decay=lr_decay, weight_decay=g.weight_decay, eps=eps,
                maximize=False, grad_scale=None, found_inf=_on(found_inf, g.device),
            )  # fmt: skip

    recipe = InPlaceRecipe(
        moments=moments,
        kernel="_fused_adagrad_",
        run_kernel=run_kernel,
        devices=_FUSED_ADAGRAD_DEVICES,
    )
    return in_place_step(tx, recipe, name="adagrad", weight_decay=weight_decay, mask=mask)


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
    mask: DecayMask | None = None,
) -> InPlaceUpdateFn:
    """In-place LAMB with ``torch._foreach_*`` ops (torch has no fused LAMB kernel)."""

    foreach = _adam_foreach(
        learning_rate, b1, b2, eps, weight_decay, True, mask,
        bias_correction=bias_correction, trust_ratio=(min_coeff, max_coeff),
    )  # fmt: skip
    recipe = InPlaceRecipe(moments=lambda state: _adam_moments(state)[:1], foreach=foreach)
    return in_place_step(tx, recipe, name="lamb", weight_decay=weight_decay, mask=mask)


def lion_update_(
    tx: GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule,
    b2: float,
    weight_decay: float,
    mask: DecayMask | None = None,
) -> InPlaceUpdateFn:
    """In-place Lion with ``torch._foreach_*`` ops (torch has no fused Lion kernel)."""

    def foreach(grads: Updates, params: Params, state: OptState, reduce_fn: ReduceFn | None):
        lion = find_state(state, ScaleByLionState)
        _foreach.lion_step_(
            grads, params, lion.mu, learning_rate=current_lr(learning_rate, state),
            b1=resolve(b1, lion.count), b2=b2, weight_decay=weight_decay, mask=mask,
        )  # fmt: skip

    recipe = InPlaceRecipe(moments=lambda state: [find_state(state, ScaleByLionState).mu],
                           foreach=foreach)  # fmt: skip
    return in_place_step(tx, recipe, name="lion", weight_decay=weight_decay, mask=mask)
