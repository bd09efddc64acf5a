"""Donation semantics for any transform: run the pure update, then copy into the buffers.

This is the exact, always-available in-place path. The fused and foreach paths in
:mod:`funczero.optim.fused` are faster; they fall back to this one when they cannot run, and for
steps that may be skipped (``found_inf``) where no fused kernel can do the skipping.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from funczero.optim._common import keys_of
from funczero.optim.base import (
    GradientTransformation,
    InPlaceUpdateFn,
    OptState,
    Params,
    ReduceFn,
    Updates,
    apply_updates,
)

__all__ = ["inplace_update"]


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


def apply_updates_(params: Params, updates: Updates, found_inf: Tensor | None = None) -> None:
    """:func:`~funczero.optim.apply_updates` written into ``params`` (skipped when ``found_inf``).

    ``p.add_(u)`` computes in the promoted dtype and rounds once to ``p``'s, exactly as
    ``(p + u).to(p.dtype)``.
    """
    keys = list(updates)
    if not keys:
        return
    ps, us = keys_of(params, keys), [updates[k] for k in keys]
    if found_inf is not None:
        _commit_(ps, [(p + u).to(p.dtype) for p, u in zip(ps, us)], found_inf)
    elif all(p.dtype == u.dtype and p.device == u.device for p, u in zip(ps, us)):
        torch._foreach_add_(ps, us)
    else:
        for p, u in zip(ps, us):
            p.add_(u)


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


def has_in_place_step(tx: Any) -> bool:
    """Whether :func:`step_` can step ``tx`` in place (it has ``update_`` or ``transform_``)."""
    return getattr(tx, "update_", None) is not None or getattr(tx, "transform_", None) is not None


def step_(
    tx: GradientTransformation,
    grads: Updates,
    state: OptState,
    params: Params,
    found_inf: Tensor | None,
    reduce_fn: ReduceFn | None,
) -> OptState:
    """One in-place step of ``tx``: its ``update_``, else its ``transform_`` and an in-place add.

    The wrappers (:func:`~funczero.optim.masked`, :func:`~funczero.optim.partition`, ...) step
    their members with it, so a member's fused kernel runs where it has one.
    """
    if tx.update_ is not None:
        return tx.update_(grads, state, params, found_inf=found_inf, reduce_fn=reduce_fn)
    if tx.transform_ is None:
        raise TypeError("step_: the transform has neither update_ nor transform_")
    new = tx.transform_(grads, state, params, found_inf=found_inf, reduce_fn=reduce_fn)
    apply_updates_(params, grads, found_inf)
    return new
