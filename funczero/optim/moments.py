"""Transforms that keep per-parameter moment buffers: Adam, momentum, Lion and Adagrad.

All math is elementwise, so it is correct on 1-D zero-padded ZeRO shards, and padding stays
zero (a zero gradient with zero moments gives a zero update). Moments are kept in at least fp32.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> params = {"w": torch.zeros(2)}
    >>> tx = optim.scale_by_adam()
    >>> tx.update({"w": torch.tensor([2.0, -3.0])}, tx.init(params))[0]["w"].round(decimals=4)
    tensor([ 1., -1.])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from funczero.optim._common import bias_correction as _bias_correction
from funczero.optim._common import (
    check_float,
    check_hparam,
    check_keys,
    resolve,
    scalar_dtype,
    zero_count,
    zeros_moment,
)
from funczero.optim.base import GradientTransformation, OptState, Params, ScalarOrSchedule, Updates

__all__ = [
    "DampedTraceState",
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleByRssState",
    "TraceState",
    "scale_by_adam",
    "scale_by_lion",
    "scale_by_rss",
    "trace",
]


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
        count: int64 0-d tensor, applied updates so far (bias correction uses ``count + 1``).
        mu: First moments, keyed like the parameters.
        nu: Second moments, keyed like the parameters.
    """

    count: Tensor
    mu: Params
    nu: Params


class TraceState(NamedTuple):
    """State of :func:`trace` without dampening.

    Attributes:
        trace: Momentum buffers, keyed like the parameters.
    """

    trace: Params


class DampedTraceState(NamedTuple):
    """State of :func:`trace` with ``dampening != 0``: the count tells the first step apart.

    Attributes:
        count: int64 0-d tensor, applied updates so far.
        trace: Momentum buffers, keyed like the parameters.
    """

    count: Tensor
    trace: Params


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`.

    Attributes:
        count: int64 0-d tensor, applied updates so far (drives a scheduled ``b1``).
        mu: Momentum, keyed like the parameters.
    """

    count: Tensor
    mu: Params


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`.

    Attributes:
        sum_of_squares: Accumulated squared gradients, keyed like the parameters.
    """

    sum_of_squares: Params


def _lerp(start: Tensor, end: Tensor, weight: float | Tensor) -> Tensor:
    if isinstance(weight, Tensor):
        weight = weight.to(device=start.device, dtype=start.dtype)
    return torch.lerp(start, end, weight)


def scale_by_adam(
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    bias_correction: bool = True,
) -> GradientTransformation:
    r"""Rescale updates by Adam's bias-corrected moment estimates.

    With :math:`t = \mathrm{count} + 1`:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        u = \frac{m / (1-\beta_1^t)}{\sqrt{v} / \sqrt{1-\beta_2^t} + \epsilon}

    (``torch.optim.Adam``'s arrangement of ``eps``). With ``bias_correction=False`` the two
    corrections are 1. A scheduled ``b1`` (DeepSpeed OneCycle momentum) is evaluated at ``count``
    and its current value is used in the bias correction, as torch does when ``betas`` change.

    Args:
        b1: First-moment decay in [0, 1): float, 0-d tensor or schedule.
        b2: Second-moment decay in [0, 1).
        eps: Added to the denominator, >= 0.
        bias_correction: Apply Adam's bias correction (LAMB can turn it off).

    Returns:
        A transform with state :class:`ScaleByAdamState`.

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2014.

    Example:
        >>> import torch
        >>> tx = scale_by_adam(b1=0.9, b2=0.999)
        >>> p = {"w": torch.zeros(1)}
        >>> u = tx.update({"w": torch.full((1,), 5.0)}, tx.init(p))[0]["w"]
        >>> u.round(decimals=4)  # 1 - 6e-8 or exactly 1, depending on the CPU's vector unit
        tensor([1.])
    """
    hint = "; typical values are b1=0.9, b2=0.999"
    b1 = check_hparam("scale_by_adam", "b1", b1, low=0.0, high=1.0, high_open=True, hint=hint)
    b2 = check_float("scale_by_adam", "b2", b2, low=0.0, high=1.0, high_open=True, hint=hint)
    eps = check_float("scale_by_adam", "eps", eps, low=0.0)

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=zero_count(params),
            mu={k: zeros_moment(p) for k, p in params.items()},
            nu={k: zeros_moment(p) for k, p in params.items()},
        )

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del params, extra
        check_keys("scale_by_adam", updates, state.mu)
        count = state.count
        beta1 = resolve(b1, count)
        if bias_correction:
            bc1 = _bias_correction(beta1, count)
            bc2_sqrt = _bias_correction(b2, count).sqrt()
        mu, nu, out = {}, {}, {}
        for k, g in updates.items():
            m0, v0 = state.mu[k], state.nu[k]
            g = g.to(m0.dtype)
            m = _lerp(m0, g, 1 - beta1)
            v = torch.addcmul(v0 * b2, g, g, value=1 - b2)
            if bias_correction:
                # Cast the float64 corrections to the moment dtype: a 0-d parameter would
                # otherwise promote its whole update to float64.
                c1, c2 = bc1.to(m.dtype), bc2_sqrt.to(m.dtype)
                out[k] = (m / (v.sqrt() / c2 + eps)) / c1
            else:
                out[k] = m / (v.sqrt() + eps)
            mu[k], nu[k] = m, v
        return out, ScaleByAdamState(count=count + 1, mu=mu, nu=nu)

    return GradientTransformation(init_fn, update_fn)


def trace(
    decay: float, nesterov: bool = False, *, dampening: float = 0.0
) -> GradientTransformation:
    r"""Momentum with ``torch.optim.SGD`` semantics.

    .. math::
        b \leftarrow \begin{cases} g & \text{first step} \\
        \mu b + (1 - \tau) g & \text{after} \end{cases},\qquad
        u = \begin{cases} g + \mu b & \text{nesterov} \\ b & \text{otherwise} \end{cases}

    With ``dampening`` :math:`\tau = 0` this is optax's ``trace`` (buffers start at zero, so the
    first step needs no special case) and the state is :class:`TraceState`; otherwise the state is
    :class:`DampedTraceState`, whose ``count`` selects the undamped first step without a branch.

    Args:
        decay: Momentum factor :math:`\mu \ge 0`.
        nesterov: Use Nesterov momentum (requires ``dampening == 0``, as in torch).
        dampening: Dampening :math:`\tau` applied after the first step.

    Returns:
        A transform with state :class:`TraceState` or :class:`DampedTraceState`.

    Example:
        >>> import torch
        >>> tx = trace(0.9)
        >>> p = {"w": torch.zeros(1)}
        >>> u, s = tx.update({"w": torch.ones(1)}, tx.init(p))
        >>> tx.update({"w": torch.ones(1)}, s)[0]["w"]
        tensor([1.9000])
    """
    decay = check_float("trace", "decay", decay, low=0.0)
    dampening = check_float("trace", "dampening", dampening)
    if nesterov and (decay <= 0.0 or dampening != 0.0):
        raise ValueError(
            f"trace: nesterov=True requires decay > 0 and dampening == 0, got decay={decay}, "
            f"dampening={dampening}"
        )
    damped = dampening != 0.0

    def init_fn(params: Params) -> OptState:
        buffers = {k: zeros_moment(p) for k, p in params.items()}
        if damped:
            return DampedTraceState(count=zero_count(params), trace=buffers)
        return TraceState(trace=buffers)

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del params, extra
        check_keys("trace", updates, state.trace)
        # torch starts the buffer as a copy of the first gradient; with zero buffers that is
        # ``decay * 0 + 1 * g``, so only the gradient's coefficient depends on the step.
        coef: float | Tensor = 1.0
        if damped:
            coef = 1.0 - dampening * (state.count > 0).to(scalar_dtype(state.count.device))
        new_trace, out = {}, {}
        for k, g in updates.items():
            b0 = state.trace[k]
            g = g.to(b0.dtype)
            b = b0 * decay + (g if isinstance(coef, float) else g * coef.to(g.dtype))
            new_trace[k] = b
            out[k] = g + b * decay if nesterov else b
        if damped:
            return out, DampedTraceState(count=state.count + 1, trace=new_trace)
        return out, TraceState(trace=new_trace)

    return GradientTransformation(init_fn, update_fn)


def scale_by_lion(b1: ScalarOrSchedule = 0.9, b2: float = 0.99) -> GradientTransformation:
    r"""The Lion direction: the sign of an interpolation of momentum and gradient.

    .. math::
        u = \operatorname{sign}(\beta_1 m + (1-\beta_1) g),\qquad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    Args:
        b1: Interpolation factor for the update direction in [0, 1]; float, tensor or schedule.
        b2: Momentum decay in [0, 1].

    Returns:
        A transform with state :class:`ScaleByLionState`.

    References:
        Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023 (Algorithm 2).

    Example:
        >>> import torch
        >>> tx = scale_by_lion()
        >>> p = {"w": torch.zeros(2)}
        >>> tx.update({"w": torch.tensor([0.3, -2.0])}, tx.init(p))[0]["w"]
        tensor([ 1., -1.])
    """
    b1 = check_hparam("scale_by_lion", "b1", b1, low=0.0, high=1.0)
    b2 = check_float("scale_by_lion", "b2", b2, low=0.0, high=1.0)

    def init_fn(params: Params) -> ScaleByLionState:
        return ScaleByLionState(
            count=zero_count(params), mu={k: zeros_moment(p) for k, p in params.items()}
        )

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del params, extra
        check_keys("scale_by_lion", updates, state.mu)
        beta1 = resolve(b1, state.count)
        mu, out = {}, {}
        for k, g in updates.items():
            m0 = state.mu[k]
            g = g.to(m0.dtype)
            out[k] = torch.sign(_lerp(m0, g, 1 - beta1))
            mu[k] = _lerp(m0, g, 1 - b2)
        return out, ScaleByLionState(count=state.count + 1, mu=mu)

    return GradientTransformation(init_fn, update_fn)


def scale_by_rss(
    initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> GradientTransformation:
    r"""Adagrad's scaling by the root of the summed squared gradients (torch placement of eps).

    .. math::
        s \leftarrow s + g^2,\qquad u = \frac{g}{\sqrt{s} + \epsilon}

    Unlike optax's ``scale_by_rss`` (``g / sqrt(s + eps)``), ``eps`` is added outside the root and
    the defaults are ``torch.optim.Adagrad``'s, so the alias matches torch exactly.

    Args:
        initial_accumulator_value: Starting value of ``s``, >= 0.
        eps: Added to the denominator, >= 0.

    Returns:
        A transform with state :class:`ScaleByRssState`.

    Example:
        >>> import torch
        >>> tx = scale_by_rss()
        >>> p = {"w": torch.zeros(1)}
        >>> tx.update({"w": torch.full((1,), -3.0)}, tx.init(p))[0]["w"]
        tensor([-1.])
    """
    iav = check_float(
        "scale_by_rss", "initial_accumulator_value", initial_accumulator_value, low=0.0
    )
    eps = check_float("scale_by_rss", "eps", eps, low=0.0)

    def init_fn(params: Params) -> ScaleByRssState:
        return ScaleByRssState(sum_of_squares={k: zeros_moment(p, iav) for k, p in params.items()})

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del params, extra
        check_keys("scale_by_rss", updates, state.sum_of_squares)
        sums, out = {}, {}
        for k, g in updates.items():
            s0 = state.sum_of_squares[k]
            g = g.to(s0.dtype)
            s = torch.addcmul(s0, g, g)
            out[k] = g / (s.sqrt() + eps)
            sums[k] = s
        return out, ScaleByRssState(sum_of_squares=sums)

    return GradientTransformation(init_fn, update_fn)
