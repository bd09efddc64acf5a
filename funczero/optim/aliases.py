"""Named optimizers with torch.optim (and DeepSpeed) semantics, as chains of transforms.

Each alias returns an :class:`~funczero.optim.Optimizer`: the pure ``init``/``update`` of the chain,
``learning_rate(state)`` for metrics, and a fused in-place ``update_``. Hyperparameter names follow
optax (``learning_rate``, ``b1``, ``b2``); ``docs/optimizers.md`` maps torch.optim's and
DeepSpeed's names onto them.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> params = {"w": torch.ones(2)}
    >>> opt = optim.sgd(0.1, momentum=0.9)
    >>> state = opt.init(params)
    >>> state = opt.update_({"w": torch.ones(2)}, state, params)
    >>> params["w"]
    tensor([0.9000, 0.9000])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optree
import torch
from torch import Tensor

from funczero.optim._common import check_float, check_hparam, scalar_dtype
from funczero.optim.base import (
    GradientTransformation,
    InPlaceUpdateFn,
    LearningRateFn,
    Optimizer,
    OptState,
    ScalarOrSchedule,
)
from funczero.optim.chain import chain
from funczero.optim.clipping import scale_by_trust_ratio
from funczero.optim.fused import (
    adagrad_update_,
    adam_update_,
    current_lr,
    lamb_update_,
    lion_update_,
    sgd_update_,
)
from funczero.optim.masks import WeightDecayMask, decay_mask
from funczero.optim.moments import scale_by_adam, scale_by_lion, scale_by_rss, trace
from funczero.optim.scaling import add_decayed_weights, scale_by_learning_rate

__all__ = ["adagrad", "adam", "adamw", "lamb", "lion", "sgd"]

_LR_HINT = "; pass a non-negative float, a floating 0-d tensor or a schedule"


def _state_device(state: OptState) -> torch.device:
    for leaf in optree.tree_leaves(state):
        if isinstance(leaf, Tensor):
            return leaf.device
    return torch.device("cpu")


def _lr_reader(learning_rate: ScalarOrSchedule) -> LearningRateFn:
    def learning_rate_fn(state: OptState) -> Tensor:
        lr = current_lr(learning_rate, state)
        device = _state_device(state)
        if isinstance(lr, Tensor):
            return lr.to(device=device, dtype=torch.float32)
        # full() fills on the device; as_tensor(float) would copy from host memory (a sync).
        return torch.full((), lr, dtype=torch.float32, device=device)

    return learning_rate_fn


def _optimizer(
    tx: GradientTransformation, learning_rate: ScalarOrSchedule, update_: InPlaceUpdateFn
) -> Optimizer:
    return Optimizer(tx.init, tx.update, _lr_reader(learning_rate), update_)


def _lr_and_decay(
    who: str, learning_rate: ScalarOrSchedule, weight_decay: float
) -> tuple[ScalarOrSchedule, float]:
    lr = check_hparam(who, "learning_rate", learning_rate, low=0.0, hint=_LR_HINT)
    wd = check_float(who, "weight_decay", weight_decay, low=0.0)
    return lr, wd


def _betas(
    who: str, b1: ScalarOrSchedule, b2: float, *, closed: bool = False
) -> tuple[ScalarOrSchedule, float]:
    hint = "; betas are decay rates, typically b1=0.9 and b2=0.999"
    b1 = check_hparam(who, "b1", b1, low=0.0, high=1.0, high_open=not closed, hint=hint)
    b2 = check_float(who, "b2", b2, low=0.0, high=1.0, high_open=not closed, hint=hint)
    return b1, b2


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: WeightDecayMask | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Optimizer:
    """Stochastic gradient descent with ``torch.optim.SGD`` semantics.

    ``g += weight_decay * p`` (L2); with momentum ``b = g`` on the first step and
    ``b = momentum * b + (1 - dampening) * g`` after; the step is ``b`` (or ``g + momentum * b``
    with Nesterov); ``p -= lr * step``.

    Args:
        learning_rate: Float, 0-d tensor or schedule.
        momentum: Momentum factor, >= 0 (0 disables the buffer).
        dampening: Dampening of the gradient after the first step.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 penalty added to the gradient.
        mask: Which parameters are decayed, as in :func:`adamw`; ``None`` decays all of them.
        shapes: Global parameter shapes for a predicate ``mask`` (ZeRO stages 1-3).

    Returns:
        An :class:`Optimizer`; its state is ``(EmptyState(), TraceState, lr state)`` (no trace
        entry when ``momentum == 0``).

    Example:
        >>> import torch
        >>> opt = sgd(0.5)
        >>> p = {"w": torch.ones(1)}
        >>> _ = opt.update_({"w": torch.ones(1)}, opt.init(p), p)
        >>> p["w"]
        tensor([0.5000])
    """
    lr, wd = _lr_and_decay("sgd", learning_rate, weight_decay)
    momentum = check_float("sgd", "momentum", momentum, low=0.0)
    dampening = check_float("sgd", "dampening", dampening)
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError(
            f"sgd: nesterov=True requires momentum > 0 and dampening == 0 (as torch.optim.SGD), "
            f"got momentum={momentum}, dampening={dampening}"
        )
    decays = decay_mask("sgd", mask, shapes)
    members = [add_decayed_weights(wd, mask=decays)]
    if momentum != 0.0:
        members.append(trace(momentum, nesterov, dampening=dampening))
    members.append(scale_by_learning_rate(lr))
    tx = chain(*members)
    update_ = sgd_update_(
        tx,
        learning_rate=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=wd,
        mask=decays,
    )
    return _optimizer(tx, lr, update_)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
    mask: WeightDecayMask | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Optimizer:
    """Adam with ``torch.optim.Adam`` semantics: ``weight_decay`` is L2, added to the gradient.

    ``g += weight_decay * p``, then :func:`~funczero.optim.scale_by_adam`, then ``p -= lr * u``.
    For decoupled decay use :func:`adamw`. (DeepSpeed's ``"type": "Adam"`` is AdamW unless
    ``adam_w_mode`` is false.)

    Args:
        learning_rate: Float, 0-d tensor or schedule.
        b1: First-moment decay (float, tensor or schedule; a schedule is DeepSpeed OneCycle's
            momentum and disables the fused kernel).
        b2: Second-moment decay.
        eps: Denominator term (``sqrt(v_hat) + eps``).
        weight_decay: L2 penalty.
        mask: Which parameters are decayed, as in :func:`adamw`; ``None`` decays all of them.
        shapes: Global parameter shapes for a predicate ``mask`` (ZeRO stages 1-3).

    Returns:
        An :class:`Optimizer`; state ``(EmptyState(), ScaleByAdamState, lr state)``.

    Example:
        >>> import torch
        >>> opt = adam(0.1)
        >>> p = {"w": torch.ones(1)}
        >>> _ = opt.update_({"w": torch.full((1,), 3.0)}, opt.init(p), p)
        >>> p["w"]
        tensor([0.9000])
    """
    lr, wd = _lr_and_decay("adam", learning_rate, weight_decay)
    b1, b2 = _betas("adam", b1, b2)
    eps = check_float("adam", "eps", eps, low=0.0)
    decays = decay_mask("adam", mask, shapes)
    tx = chain(
        add_decayed_weights(wd, mask=decays), scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr)
    )
    update_ = adam_update_(
        tx, learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, decoupled=False, mask=decays
    )
    return _optimizer(tx, lr, update_)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.01,
    mask: WeightDecayMask | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Optimizer:
    """AdamW with ``torch.optim.AdamW`` semantics: decoupled decay ``p *= 1 - lr * weight_decay``.

    :func:`~funczero.optim.scale_by_adam`, then ``+ weight_decay * p``, then ``* -lr``. Note the
    decay is multiplied by the learning rate (PyTorch's convention, not the paper's separate
    schedule multiplier).

    Args:
        learning_rate: Float, 0-d tensor or schedule.
        b1: First-moment decay (float, tensor or schedule).
        b2: Second-moment decay.
        eps: Denominator term.
        weight_decay: Decoupled decay coefficient (default 0.01, as torch).
        mask: Which parameters are decayed: a predicate ``(name, global_shape) -> bool`` such as
            :func:`~funczero.optim.no_decay_for_norms_and_biases`, a set of names, or a dict
            ``{name: bool}`` (:mod:`funczero.optim.masks`); ``None`` decays all of them.
        shapes: Global parameter shapes for a predicate ``mask`` under ZeRO stages 1-3, where
            the optimizer holds 1-D shards (``plan.spec.shapes``).

    Returns:
        An :class:`Optimizer`; state ``(ScaleByAdamState, EmptyState(), lr state)``.

    Example:
        >>> import torch
        >>> opt = adamw(0.1, weight_decay=0.0)
        >>> p = {"w": torch.ones(1)}
        >>> _ = opt.update_({"w": torch.full((1,), -3.0)}, opt.init(p), p)
        >>> p["w"]
        tensor([1.1000])
    """
    lr, wd = _lr_and_decay("adamw", learning_rate, weight_decay)
    b1, b2 = _betas("adamw", b1, b2)
    eps = check_float("adamw", "eps", eps, low=0.0)
    decays = decay_mask("adamw", mask, shapes)
    tx = chain(
        scale_by_adam(b1, b2, eps), add_decayed_weights(wd, mask=decays), scale_by_learning_rate(lr)
    )
    update_ = adam_update_(
        tx, learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, decoupled=True, mask=decays
    )
    return _optimizer(tx, lr, update_)


def lion(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.99,
    *,
    weight_decay: float = 0.0,
    mask: WeightDecayMask | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Optimizer:
    """Lion (Chen et al. 2023) with decoupled decay: ``p -= lr * (sign(c) + weight_decay * p)``.

    ``c = b1 * m + (1 - b1) * g``, then ``m = b2 * m + (1 - b2) * g``. Use a learning rate 3-10x
    smaller and a weight decay 3-10x larger than for AdamW.

    Args:
        learning_rate: Float, 0-d tensor or schedule.
        b1: Interpolation factor of the update direction (float, tensor or schedule).
        b2: Momentum decay.
        weight_decay: Decoupled decay coefficient (multiplied by the learning rate).
        mask: Which parameters are decayed, as in :func:`adamw`; ``None`` decays all of them.
        shapes: Global parameter shapes for a predicate ``mask`` (ZeRO stages 1-3).

    Returns:
        An :class:`Optimizer`; state ``(ScaleByLionState, EmptyState(), lr state)``.

    Example:
        >>> import torch
        >>> opt = lion(0.1)
        >>> p = {"w": torch.zeros(2)}
        >>> _ = opt.update_({"w": torch.tensor([2.0, -0.1])}, opt.init(p), p)
        >>> p["w"]
        tensor([-0.1000,  0.1000])
    """
    lr, wd = _lr_and_decay("lion", learning_rate, weight_decay)
    b1, b2 = _betas("lion", b1, b2, closed=True)
    decays = decay_mask("lion", mask, shapes)
    tx = chain(
        scale_by_lion(b1, b2), add_decayed_weights(wd, mask=decays), scale_by_learning_rate(lr)
    )
    update_ = lion_update_(tx, learning_rate=lr, b1=b1, b2=b2, weight_decay=wd, mask=decays)
    return _optimizer(tx, lr, update_)


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    weight_decay: float = 0.0,
    bias_correction: bool = True,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    mask: WeightDecayMask | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Optimizer:
    r"""LAMB (You et al. 2019) with DeepSpeed ``FusedLamb``'s trust-ratio clamp.

    With :math:`t = \mathrm{count}+1` and, per parameter tensor :math:`p`:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        u = \frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon} + \lambda p

    .. math::
        r = \operatorname{clip}\!\left(\frac{\lVert p\rVert}{\lVert u\rVert},
        c_{\min}, c_{\max}\right) \text{ (1 if either norm is 0)},\qquad
        p \leftarrow p - \eta\, r\, u

    Norms are over the whole parameter; under ZeRO the shards' partial sums go through one
    ``reduce_fn`` call per step (see :func:`~funczero.optim.scale_by_trust_ratio`).

    Args:
        learning_rate: Float, 0-d tensor or schedule.
        b1: First-moment decay (float, tensor or schedule).
        b2: Second-moment decay.
        eps: Denominator term (outside the root, DeepSpeed's default ``eps_inside_sqrt=False``).
        weight_decay: :math:`\lambda`, added to the update before the trust ratio.
        bias_correction: Bias-correct ``m`` and ``v`` (DeepSpeed default True).
        max_coeff: Upper clamp of the trust ratio.
        min_coeff: Lower clamp of the trust ratio.
        mask: Which parameters are decayed, as in :func:`adamw`; ``None`` decays all of them.
        shapes: Global parameter shapes for a predicate ``mask`` (ZeRO stages 1-3).

    Returns:
        An :class:`Optimizer`; state ``(ScaleByAdamState, EmptyState(), EmptyState(),
        lr state)``.

    Example:
        >>> import torch
        >>> opt = lamb(0.1)
        >>> p = {"w": torch.tensor([3.0, 4.0])}
        >>> _ = opt.update_({"w": torch.tensor([1.0, 1.0])}, opt.init(p), p)
        >>> p["w"]
        tensor([2.6464, 3.6464])
    """
    lr, wd = _lr_and_decay("lamb", learning_rate, weight_decay)
    b1, b2 = _betas("lamb", b1, b2)
    eps = check_float("lamb", "eps", eps, low=0.0)
    min_coeff = check_float("lamb", "min_coeff", min_coeff, low=0.0)
    max_coeff = check_float(
        "lamb", "max_coeff", max_coeff, low=min_coeff, hint=f" (min_coeff={min_coeff})"
    )
    decays = decay_mask("lamb", mask, shapes)
    tx = chain(
        scale_by_adam(b1, b2, eps, bias_correction=bias_correction),
        add_decayed_weights(wd, mask=decays),
        scale_by_trust_ratio(min_coeff=min_coeff, max_coeff=max_coeff),
        scale_by_learning_rate(lr),
    )
    update_ = lamb_update_(
        tx, learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd,
        bias_correction=bias_correction, min_coeff=min_coeff, max_coeff=max_coeff, mask=decays,
    )  # fmt: skip
    return _optimizer(tx, lr, update_)


def adagrad(
    learning_rate: ScalarOrSchedule,
    *,
    lr_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
    mask: WeightDecayMask | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Optimizer:
    """Adagrad with ``torch.optim.Adagrad`` semantics.

    ``g += weight_decay * p``; ``s += g * g``; ``p -= lr_t * g / (sqrt(s) + eps)`` with
    ``lr_t = lr(count) / (1 + count * lr_decay)``.

    Args:
        learning_rate: Float, 0-d tensor or schedule (the base rate before ``lr_decay``).
        lr_decay: Inverse-time decay of the learning rate, >= 0.
        initial_accumulator_value: Starting value of ``s``.
        eps: Denominator term.
        weight_decay: L2 penalty.
        mask: Which parameters are decayed, as in :func:`adamw`; ``None`` decays all of them.
        shapes: Global parameter shapes for a predicate ``mask`` (ZeRO stages 1-3).

    Returns:
        An :class:`Optimizer`; state ``(EmptyState(), ScaleByRssState, lr state)``;
        ``learning_rate(state)`` reports ``lr_t``.

    Example:
        >>> import torch
        >>> opt = adagrad(0.5)
        >>> p = {"w": torch.ones(1)}
        >>> _ = opt.update_({"w": torch.full((1,), 4.0)}, opt.init(p), p)
        >>> p["w"]
        tensor([0.5000])
    """
    lr, wd = _lr_and_decay("adagrad", learning_rate, weight_decay)
    lr_decay = check_float("adagrad", "lr_decay", lr_decay, low=0.0)
    iav = check_float("adagrad", "initial_accumulator_value", initial_accumulator_value, low=0.0)
    eps = check_float("adagrad", "eps", eps, low=0.0)

    effective: ScalarOrSchedule = lr
    if lr_decay != 0.0:
        base = lr

        def effective(count: Tensor) -> Tensor:
            # float64 so a float base rate matches torch's Python-double arithmetic exactly.
            b = base(count) if callable(base) else base
            if isinstance(b, Tensor):
                b = b.to(count.device)
            return b / (1.0 + count.to(scalar_dtype(count.device)) * lr_decay)

    decays = decay_mask("adagrad", mask, shapes)
    tx = chain(
        add_decayed_weights(wd, mask=decays),
        scale_by_rss(iav, eps),
        scale_by_learning_rate(effective),
    )
    update_ = adagrad_update_(
        tx, learning_rate=lr, lr_decay=lr_decay, weight_decay=wd, eps=eps, mask=decays
    )
    return _optimizer(tx, effective, update_)
