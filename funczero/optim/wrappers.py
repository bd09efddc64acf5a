"""Wrappers that decide per step whether the inner optimizer steps: :func:`MultiSteps` and
:func:`apply_if_finite`.

Both decide on the device, without a host sync: the decision is a 0-d tensor, every counter is
an int64 0-d tensor in the state, and the inner optimizer runs every step with the decision as
its ``found_inf`` (the fused kernels skip on the device) on the in-place path, or with its result
selected by ``torch.where`` on the pure path. So a chain holding them keeps the fused in-place
step, and their state checkpoints like any other.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> opt = optim.MultiSteps(optim.sgd(1.0), every_k=2)
    >>> params = {"w": torch.zeros(1)}
    >>> state = opt.init(params)
    >>> state = opt.update_({"w": torch.tensor([1.0])}, state, params)
    >>> params["w"]                      # first of two mini-steps: accumulated, not applied
    tensor([0.])
    >>> state = opt.update_({"w": torch.tensor([3.0])}, state, params)
    >>> params["w"], state.mini_step     # one SGD step on the mean gradient, 2
    (tensor([-2.]), tensor(0))
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funczero.optim._common import (
    check_keys,
    reduce,
    tree_where,
    zero_count,
    zeros_moment,
)
from funczero.optim.base import (
    GradientTransformation,
    InPlaceTransformFn,
    InPlaceUpdateFn,
    LearningRateFn,
    OptState,
    Params,
    ReduceFn,
    Updates,
)
from funczero.optim.inplace import has_in_place_step, step_

__all__ = ["ApplyIfFiniteState", "MultiSteps", "MultiStepsState", "all_finite", "apply_if_finite"]


class MultiStepsState(NamedTuple):
    """State of :func:`MultiSteps` (optax's field names).

    Attributes:
        mini_step: int64 0-d tensor, gradients accumulated since the last inner step
            (``0 .. every_k - 1``).
        gradient_step: int64 0-d tensor, inner steps taken.
        inner_opt_state: The inner optimizer's state.
        acc_grads: The sum of the gradients since the last inner step, keyed like the
            parameters, in at least fp32.
    """

    mini_step: Tensor
    gradient_step: Tensor
    inner_opt_state: OptState
    acc_grads: Params


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite` (optax's field names).

    Attributes:
        notfinite_count: int64 0-d tensor, consecutive non-finite updates up to now.
        last_finite: bool 0-d tensor, whether the last update was finite.
        total_notfinite: int64 0-d tensor, non-finite updates in all.
        inner_state: The inner transform's state.
    """

    notfinite_count: Tensor
    last_finite: Tensor
    total_notfinite: Tensor
    inner_state: OptState


def _inner_learning_rate(inner: GradientTransformation, field: str) -> LearningRateFn | None:
    read = inner.learning_rate
    if read is None:
        return None

    def learning_rate(state: OptState) -> Tensor:
        return read(getattr(state, field))

    return learning_rate


def _add_(dst: list[Tensor], src: list[Tensor]) -> None:
    """``d += s`` (rounded once to ``d``'s dtype, as ``d + s.to(d.dtype)``)."""
    if not dst:
        return
    if all(d.dtype == s.dtype and d.device == s.device for d, s in zip(dst, src)):
        torch._foreach_add_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.add_(s.to(d.device))


def _zero_where_(tensors: list[Tensor], cond: Tensor) -> None:
    """Set every element to 0 where the 0-d bool ``cond`` holds (also over inf and nan)."""
    for t in tensors:
        t.masked_fill_(cond.to(t.device), 0)


def MultiSteps(inner: GradientTransformation, every_k: int) -> GradientTransformation:
    """Gradient accumulation as a transform: ``inner`` steps on the mean of every ``every_k``
    gradients (optax's ``MultiSteps``).

    Each update adds the gradient to ``acc_grads``; on every ``every_k``-th (``mini_step`` reaches
    ``every_k``) ``inner`` updates on ``acc_grads / every_k`` (cast to the gradient's dtype), the
    accumulator is zeroed and ``gradient_step`` advances; the other updates are zeros and leave
    ``inner``'s state unchanged. So ``every_k`` updates equal one ``inner`` update on the averaged
    gradient, and ``inner``'s schedule advances once per ``every_k`` updates. A skipped step
    (``found_inf``) accumulates nothing and does not count.

    The decision is a tensor: on the in-place path ``inner`` runs every update with
    ``found_inf = 1`` on all but the ``every_k``-th (the fused kernels then return without
    touching anything; Lion's and LAMB's foreach steps take the generic path), and the mean is
    written into the donated gradients, so nothing is allocated; on the pure path ``inner``'s
    result is selected with ``torch.where``. ``MultiSteps`` has ``update_`` when ``inner`` has
    ``update_`` or ``transform_``, and ``transform_`` when it has ``transform_``.

    Args:
        inner: The optimizer (or transform) that steps every ``every_k`` updates.
        every_k: Gradients per inner step, an int >= 1.

    Returns:
        A transform with state :class:`MultiStepsState`; ``learning_rate`` reads ``inner``'s.

    Example:
        >>> import torch
        >>> from funczero import optim
        >>> tx = MultiSteps(optim.scale(1.0), every_k=2)
        >>> p = {"w": torch.zeros(1)}
        >>> u, s = tx.update({"w": torch.tensor([1.0])}, tx.init(p))
        >>> u["w"], tx.update({"w": torch.tensor([3.0])}, s)[0]["w"]
        (tensor([0.]), tensor([2.]))
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(
            f"MultiSteps: inner is {type(inner).__name__}, not a GradientTransformation; pass "
            "an optimizer such as optim.adamw(1e-3)"
        )
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(
            f"MultiSteps: every_k={every_k!r} must be an int >= 1 (the number of gradients "
            "averaged per optimizer step)"
        )

    def init_fn(params: Params) -> MultiStepsState:
        return MultiStepsState(
            mini_step=zero_count(params),
            gradient_step=zero_count(params),
            inner_opt_state=inner.init(params),
            acc_grads={k: zeros_moment(p) for k, p in params.items()},
        )

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        check_keys("MultiSteps", updates, state.acc_grads)
        acc = {k: state.acc_grads[k] + g.to(state.acc_grads[k].dtype) for k, g in updates.items()}
        reached = state.mini_step + 1
        final = reached >= every_k
        mean = {k: (acc[k] / every_k).to(g.dtype) for k, g in updates.items()}
        stepped, inner_state = inner.update(mean, state.inner_opt_state, params, **extra)
        return {
            k: torch.where(final.to(u.device), u, 0.0) for k, u in stepped.items()
        }, MultiStepsState(
            mini_step=torch.where(final, torch.zeros_like(reached), reached),
            gradient_step=state.gradient_step + final.to(torch.int64),
            inner_opt_state=tree_where(final, inner_state, state.inner_opt_state),
            acc_grads={k: a.masked_fill(final.to(a.device), 0) for k, a in acc.items()},
        )

    def accumulate_(
        grads: Updates, state: OptState, found_inf: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Add ``grads`` to the accumulator, write the mean into ``grads``; ``(final, reached)``."""
        check_keys("MultiSteps", grads, state.acc_grads)
        keys = list(grads)
        accs, gs = [state.acc_grads[k] for k in keys], [grads[k] for k in keys]
        reached = state.mini_step + 1
        if found_inf is not None:
            skip = found_inf != 0
            _zero_where_(gs, skip)  # an inf gradient must not reach the accumulator
            reached = state.mini_step + (~skip).to(device=reached.device, dtype=torch.int64)
        _add_(accs, gs)
        final = reached >= every_k
        for a, g in zip(accs, gs):
            # one rounding to the gradient's dtype, as the pure path's (acc / k).to(g.dtype)
            torch.div(a, every_k, out=g)
        return final, reached

    def finish(state: OptState, final: Tensor, reached: Tensor, inner_state: OptState):
        _zero_where_(list(state.acc_grads.values()), final)
        return MultiStepsState(
            mini_step=torch.where(final, torch.zeros_like(reached), reached),
            gradient_step=state.gradient_step + final.to(torch.int64),
            inner_opt_state=inner_state,
            acc_grads=state.acc_grads,
        )

    update_: InPlaceUpdateFn | None = None
    if has_in_place_step(inner):

        def update_(
            grads: Updates,
            state: OptState,
            params: Params,
            *,
            found_inf: Tensor | None = None,
            reduce_fn: ReduceFn | None = None,
        ) -> OptState:
            final, reached = accumulate_(grads, state, found_inf)
            skip = (~final).to(torch.float32)
            inner_state = step_(inner, grads, state.inner_opt_state, params, skip, reduce_fn)
            return finish(state, final, reached, inner_state)

    transform_: InPlaceTransformFn | None = None
    inner_transform_ = inner.transform_
    if inner_transform_ is not None:

        def transform_(
            updates: Updates,
            state: OptState,
            params: Params | None = None,
            *,
            found_inf: Tensor | None = None,
            reduce_fn: ReduceFn | None = None,
        ) -> OptState:
            final, reached = accumulate_(updates, state, found_inf)
            skip = (~final).to(torch.float32)
            inner_state = inner_transform_(
                updates, state.inner_opt_state, params, found_inf=skip, reduce_fn=reduce_fn
            )
            _zero_where_(list(updates.values()), ~final)
            return finish(state, final, reached, inner_state)

    return GradientTransformation(
        init_fn,
        update_fn,
        _inner_learning_rate(inner, "inner_opt_state"),
        update_,
        transform_,
        members=(inner,),
    )


def all_finite(updates: Updates, reduce_fn: ReduceFn | None, device: torch.device) -> Tensor:
    """Whether every element of ``updates`` is finite, on every rank, as a bool 0-d tensor.

    One max-abs per tensor (no overflow, unlike a sum of squares), and one ``reduce_fn`` call (the
    count of non-finite tensors over the shards), so every rank decides the same.

    Example:
        >>> import torch
        >>> all_finite({"w": torch.tensor([1.0, float("inf")])}, None, torch.device("cpu"))
        tensor(False)
    """
    us = list(updates.values())
    if not us:
        bad = torch.zeros((), dtype=torch.float32, device=device)
    else:
        if all(u.dtype == us[0].dtype and u.device == us[0].device for u in us):
            norms = list(torch._foreach_norm(us, ord=math.inf))
        else:
            norms = [torch.linalg.vector_norm(u, ord=math.inf) for u in us]
        # the widest dtype holds every max-abs exactly (a bf16 max is an fp32 number)
        dtype = norms[0].dtype
        for n in norms[1:]:
            dtype = torch.promote_types(dtype, n.dtype)
        if any(n.dtype != dtype or n.device != device for n in norms):
            norms = [n.to(device=device, dtype=dtype) for n in norms]
        stacked = torch.stack(norms)
        bad = (~torch.isfinite(stacked)).sum().to(torch.float32)
    return reduce(bad, reduce_fn) == 0


def apply_if_finite(
    inner: GradientTransformation, max_consecutive_errors: int | None
) -> GradientTransformation:
    """Skip ``inner``'s update when the incoming updates are not all finite (optax semantics).

    A non-finite update gives zero updates and leaves ``inner``'s state as it was;
    ``notfinite_count`` (consecutive) and ``total_notfinite`` count them. After more than
    ``max_consecutive_errors`` in a row the update is applied anyway (so a run that keeps
    overflowing fails visibly instead of silently standing still); ``None`` skips every one.
    Finiteness is checked over the whole model: under ZeRO the shards' counts go through one
    ``reduce_fn`` call, so every rank decides the same.

    The decision is a tensor: on the in-place path ``inner`` runs with it as ``found_inf``. A step
    the caller skips (``found_inf``) changes nothing, counters included: the training step
    already skips non-finite gradients that way (and counts them in ``state.skipped``), so there
    ``apply_if_finite`` adds a check of what ``inner`` is given; in hand-written loops it is the
    skip. It has ``update_`` when ``inner`` has ``update_`` or ``transform_``, and ``transform_``
    when it has ``transform_``.

    Args:
        inner: The optimizer (or transform) to protect.
        max_consecutive_errors: Non-finite updates skipped in a row before one is applied, an
            int >= 0, or ``None`` to skip all of them.

    Returns:
        A transform with state :class:`ApplyIfFiniteState`; ``learning_rate`` reads ``inner``'s.

    Example:
        >>> import torch
        >>> from funczero import optim
        >>> opt = apply_if_finite(optim.sgd(0.1), max_consecutive_errors=3)
        >>> p = {"w": torch.ones(2)}
        >>> state = opt.update_({"w": torch.tensor([1.0, float("nan")])}, opt.init(p), p)
        >>> p["w"], state.notfinite_count, state.total_notfinite
        (tensor([1., 1.]), tensor(1), tensor(1))
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(
            f"apply_if_finite: inner is {type(inner).__name__}, not a GradientTransformation; "
            "pass an optimizer such as optim.adamw(1e-3)"
        )
    if max_consecutive_errors is not None and (
        isinstance(max_consecutive_errors, bool)
        or not isinstance(max_consecutive_errors, int)
        or max_consecutive_errors < 0
    ):
        raise ValueError(
            f"apply_if_finite: max_consecutive_errors={max_consecutive_errors!r} must be an int "
            ">= 0 (non-finite updates skipped in a row before one is applied) or None (skip all)"
        )

    def init_fn(params: Params) -> ApplyIfFiniteState:
        count = zero_count(params)
        return ApplyIfFiniteState(
            notfinite_count=count,
            last_finite=torch.ones((), dtype=torch.bool, device=count.device),
            total_notfinite=zero_count(params),
            inner_state=inner.init(params),
        )

    def decide(updates: Updates, state: OptState, reduce_fn: ReduceFn | None):
        """``(finite, apply, notfinite_count)`` for this update."""
        count = state.notfinite_count
        finite = all_finite(updates, reduce_fn, count.device)
        count = torch.where(finite, torch.zeros_like(count), count + 1)
        apply = finite
        if max_consecutive_errors is not None:
            apply = finite | (count > max_consecutive_errors)
        return finite, apply, count

    def counters(state: OptState, finite: Tensor, count: Tensor, inner_state: OptState):
        return ApplyIfFiniteState(
            notfinite_count=count,
            last_finite=finite,
            total_notfinite=state.total_notfinite + (~finite).to(torch.int64),
            inner_state=inner_state,
        )

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        finite, apply, count = decide(updates, state, extra.get("reduce_fn"))
        stepped, inner_state = inner.update(updates, state.inner_state, params, **extra)
        out = {k: torch.where(apply.to(u.device), u, 0.0) for k, u in stepped.items()}
        inner_state = tree_where(apply, inner_state, state.inner_state)
        return out, counters(state, finite, count, inner_state)

    def skipped_by_caller(state: OptState, new: OptState, found_inf: Tensor | None) -> OptState:
        """``new``'s counters, or ``state``'s where the caller skips the step."""
        if found_inf is None:
            return new
        keep = found_inf.to(state.notfinite_count.device) != 0
        return new._replace(
            notfinite_count=torch.where(keep, state.notfinite_count, new.notfinite_count),
            last_finite=torch.where(keep, state.last_finite, new.last_finite),
            total_notfinite=torch.where(keep, state.total_notfinite, new.total_notfinite),
        )

    def skip_of(apply: Tensor, found_inf: Tensor | None) -> Tensor:
        skip = ~apply
        if found_inf is not None:
            skip = skip | (found_inf.to(skip.device) != 0)
        return skip.to(torch.float32)

    update_: InPlaceUpdateFn | None = None
    if has_in_place_step(inner):

        def update_(
            grads: Updates,
            state: OptState,
            params: Params,
            *,
            found_inf: Tensor | None = None,
            reduce_fn: ReduceFn | None = None,
        ) -> OptState:
            finite, apply, count = decide(grads, state, reduce_fn)
            skip = skip_of(apply, found_inf)
            inner_state = step_(inner, grads, state.inner_state, params, skip, reduce_fn)
            return skipped_by_caller(state, counters(state, finite, count, inner_state), found_inf)

    transform_: InPlaceTransformFn | None = None
    inner_transform_ = inner.transform_
    if inner_transform_ is not None:

        def transform_(
            updates: Updates,
            state: OptState,
            params: Params | None = None,
            *,
            found_inf: Tensor | None = None,
            reduce_fn: ReduceFn | None = None,
        ) -> OptState:
            finite, apply, count = decide(updates, state, reduce_fn)
            skip = skip_of(apply, found_inf)
            inner_state = inner_transform_(
                updates, state.inner_state, params, found_inf=skip, reduce_fn=reduce_fn
            )
            _zero_where_(list(updates.values()), ~apply)
            return skipped_by_caller(state, counters(state, finite, count, inner_state), found_inf)

    return GradientTransformation(
        init_fn,
        update_fn,
        _inner_learning_rate(inner, "inner_state"),
        update_,
        transform_,
        members=(inner,),
    )
