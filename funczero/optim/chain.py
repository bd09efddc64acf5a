"""Composition: :func:`chain`, and whether a transform can take the in-place path (and why not).

A chain is pure by construction (each member's ``update`` in turn). It also has an in-place step
``update_`` when every member but the last can rewrite the updates in place (``transform_``) and
the last can either step the parameters itself (``update_``, as the aliases do) or rewrite the
updates too (then the chain adds them to the parameters in place). So
``chain(clip_by_global_norm(1.0), adamw(lr))`` clips the gradients in place and runs AdamW's fused
kernel: the same path as ``adamw(lr)`` alone. When a member breaks that rule,
:func:`in_place_unsupported_reason` names it.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.5))
    >>> params = {"w": torch.zeros(2)}
    >>> state = opt.update_({"w": torch.tensor([3.0, 4.0])}, opt.init(params), params)
    >>> params["w"]
    tensor([-0.3000, -0.4000])
    >>> optim.in_place_unsupported_reason(optim.chain(optim.scale_by_adam(), optim.scale(-0.1)))
    'chain member 0 (scale_by_adam) has no in-place transform_ (it only has the pure update)'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

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
from funczero.optim.inplace import apply_updates_

__all__ = ["chain", "in_place_unsupported_reason", "supports_in_place"]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transforms left to right; the state is the tuple of their states.

    Every ``extra`` keyword argument is passed to every member. The result has

    * ``update_`` when every member but the last has ``transform_`` and the last has ``update_``
      or ``transform_`` (the updates are then added to the parameters in place);
    * ``transform_`` when every member has one;
    * ``learning_rate`` from the last member that reports one (reading its part of the state).

    Args:
        *transforms: Transforms (or optimizers) applied in order.

    Returns:
        The composed transform. Its state is ``tuple(t.init(params) for t in transforms)``, so leaf
        paths start with the member's index (``1/mu/<fqn>``).

    Example:
        >>> import torch
        >>> from funczero import optim
        >>> tx = chain(optim.identity(), optim.scale(2.0))
        >>> tx.update({"w": torch.ones(1)}, tx.init({"w": torch.zeros(1)}))[0]["w"]
        tensor([2.])
    """
    for i, t in enumerate(transforms):
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise TypeError(
                f"chain: argument {i} is {type(t).__name__}, not a GradientTransformation; "
                "pass objects with init/update such as optim.scale_by_adam() or optim.adamw(1e-3)"
            )
    members = tuple(transforms)
    inits = tuple(t.init for t in members)
    update_fns = tuple(t.update for t in members)

    def init_fn(params: Params) -> tuple[OptState, ...]:
        return tuple(fn(params) for fn in inits)

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        _check_state(state, len(update_fns))
        new_state = []
        for fn, s in zip(update_fns, state):
            updates, s = fn(updates, s, params, **extra)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(
        init_fn,
        update_fn,
        learning_rate=_learning_rate(members),
        update_=_chain_update_(members),
        transform_=_chain_transform_(members),
        members=members,
    )


def supports_in_place(tx: Any) -> bool:
    """Whether ``tx`` has the in-place step ``update_`` (the training step's fast path).

    Example:
        >>> from funczero import optim
        >>> supports_in_place(optim.adamw(1e-3)), supports_in_place(optim.scale_by_adam())
        (True, False)
    """
    return getattr(tx, "update_", None) is not None


def in_place_unsupported_reason(tx: Any) -> str | None:
    """Why ``tx`` has no in-place ``update_``, naming the chain member at fault; ``None`` if it has.

    Without ``update_`` a training step must take the pure path (``update`` + a copy into new
    tensors), which allocates new parameters and optimizer state every step: 3-4x slower for
    AdamW (docs/optimizers.md). The training step warns with this text.

    Args:
        tx: A transform, optimizer or chain.

    Returns:
        ``None`` when ``tx.update_`` exists, else one sentence naming the member and the fix.

    Example:
        >>> from funczero import optim
        >>> in_place_unsupported_reason(optim.chain(optim.adamw(1e-3), optim.scale(0.5)))
        'chain member 0 (adamw) steps the parameters itself (update_), so it must be the last member'
    """
    if supports_in_place(tx):
        return None
    members: Sequence[Any] = getattr(tx, "members", ())
    if not members:
        return f"{_name(tx)} has no in-place update_ (it only has the pure update)"
    if not _is_chain(tx):
        return _wrapper_reason(tx, _name(tx))
    return _chain_reason(members, "chain member ")


def _name(tx: Any) -> str:
    """The factory that built ``tx`` (``clip_by_global_norm``), read off its functions' names."""
    for attr in ("update_", "transform_", "update"):
        qualname = getattr(getattr(tx, attr, None), "__qualname__", None)
        if qualname:
            return qualname.split(".<locals>")[0]
    return type(tx).__name__


def _is_chain(tx: Any) -> bool:
    """A chain, as opposed to a wrapper with members (masked, partition, MultiSteps, ...)."""
    return _name(tx) == "chain"


def _wrapper_reason(tx: Any, where: str) -> str:
    """Why the wrapper ``tx`` (at ``where``) has no ``update_``: a member can step in neither way.

    A wrapper steps each member with its ``update_`` or its ``transform_``.
    """
    for i, m in enumerate(getattr(tx, "members", ())):
        if getattr(m, "update_", None) is None and getattr(m, "transform_", None) is None:
            at = f"{where}, member {i}"
            inner: Sequence[Any] = getattr(m, "members", ())
            if inner and _is_chain(m):
                return _chain_reason(inner, f"{at}, chain member ")
            if inner:
                return _wrapper_reason(m, f"{at} ({_name(m)})")
            return (
                f"{at} ({_name(m)}) has neither update_ nor transform_ (it only has the pure "
                "update)"
            )
    raise AssertionError("every member steps in place")  # pragma: no cover


def _transform_reason(tx: Any, where: str) -> str:
    """Why ``tx`` (at ``where``) has no ``transform_``."""
    members: Sequence[Any] = getattr(tx, "members", ())
    if members and not _is_chain(tx):
        return _transform_chain_reason(members, f"{where} ({_name(tx)}), member ")
    if members:
        return _transform_chain_reason(members, where + ", member ")
    if supports_in_place(tx):
        return (
            f"{where} ({_name(tx)}) steps the parameters itself (update_), so it must be the "
            "last member"
        )
    return f"{where} ({_name(tx)}) has no in-place transform_ (it only has the pure update)"


def _transform_chain_reason(members: Sequence[Any], prefix: str) -> str:
    for i, m in enumerate(members):
        if getattr(m, "transform_", None) is None:
            return _transform_reason(m, f"{prefix}{i}")
    raise AssertionError("every member has transform_")  # pragma: no cover


def _chain_reason(members: Sequence[Any], prefix: str) -> str:
    for i, m in enumerate(members[:-1]):
        if getattr(m, "transform_", None) is None:
            return _transform_reason(m, f"{prefix}{i}")
    last = members[-1]
    inner: Sequence[Any] = getattr(last, "members", ())
    if inner and not _is_chain(last):
        return _wrapper_reason(last, f"{prefix}{len(members) - 1} ({_name(last)})")
    if inner:
        return _chain_reason(inner, f"{prefix}{len(members) - 1}, member ")
    return (
        f"{prefix}{len(members) - 1} ({_name(last)}), the last, has neither update_ nor "
        "transform_ (it only has the pure update)"
    )


def _check_state(state: OptState, n: int) -> None:
    if len(state) != n:
        raise ValueError(
            f"chain: state has {len(state)} entries but the chain has {n} transforms; the state "
            "was built by a different optimizer"
        )


def _learning_rate(members: tuple[Any, ...]) -> LearningRateFn | None:
    for i in reversed(range(len(members))):
        read = getattr(members[i], "learning_rate", None)
        if read is not None:

            def learning_rate(state: OptState, read: LearningRateFn = read, i: int = i) -> Tensor:
                return read(state[i])

            return learning_rate
    return None


def _chain_transform_(members: tuple[Any, ...]) -> InPlaceTransformFn | None:
    fns = tuple(getattr(m, "transform_", None) for m in members)
    if any(fn is None for fn in fns):
        return None

    def transform_(
        updates: Updates,
        state: OptState,
        params: Params | None = None,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        _check_state(state, len(fns))
        return tuple(
            fn(updates, s, params, found_inf=found_inf, reduce_fn=reduce_fn)
            for fn, s in zip(fns, state)
        )

    return transform_


def _chain_update_(members: tuple[Any, ...]) -> InPlaceUpdateFn | None:
    prefix = tuple(getattr(m, "transform_", None) for m in members[:-1])
    if any(fn is None for fn in prefix):
        return None
    last = members[-1] if members else None
    last_step = getattr(last, "update_", None)
    # Without a terminal update_, the chain rewrites the updates and adds them itself.
    last_transform = None if last_step is not None else getattr(last, "transform_", None)
    if members and last_step is None and last_transform is None:
        return None

    def update_(
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        _check_state(state, len(members))
        new_state = [
            fn(grads, s, params, found_inf=found_inf, reduce_fn=reduce_fn)
            for fn, s in zip(prefix, state)
        ]
        if last_step is not None:
            new_state.append(
                last_step(grads, state[-1], params, found_inf=found_inf, reduce_fn=reduce_fn)
            )
        else:
            if last_transform is not None:
                new_state.append(
                    last_transform(
                        grads, state[-1], params, found_inf=found_inf, reduce_fn=reduce_fn
                    )
                )
            apply_updates_(params, grads, found_inf)
        return tuple(new_state)

    return update_
