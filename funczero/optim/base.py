"""The optimizer contract: gradient transformations over flat parameter dicts.

A :class:`GradientTransformation` is a pair of pure functions, ``init(params) -> state`` and
``update(updates, state, params=None, **extra) -> (updates, state)``, with every hyperparameter
captured in a closure and every number that changes between steps kept in ``state``. States are
``NamedTuple`` pytrees of tensors: per-parameter fields are dicts keyed exactly like ``params``
(so a leaf path reads ``mu/blocks.0.attn.qkv.weight``) and scalars are 0-d tensors (``count`` is
int64 on the parameters' device).

Example:
    >>> import torch
    >>> from funczero import optim
    >>> params = {"w": torch.ones(3)}
    >>> tx = optim.chain(optim.scale(0.5), optim.scale(-0.1))
    >>> updates, state = tx.update({"w": torch.ones(3)}, tx.init(params), params)
    >>> optim.apply_updates(params, updates)["w"]
    tensor([0.9500, 0.9500, 0.9500])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import optree
from torch import Tensor

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "InPlaceUpdateFn",
    "LearningRateFn",
    "OptState",
    "Optimizer",
    "Params",
    "ReduceFn",
    "ScalarOrSchedule",
    "Schedule",
    "TransformInitFn",
    "TransformUpdateFn",
    "Updates",
    "apply_updates",
    "chain",
    "identity",
    "stateless",
]

Params = dict[str, Tensor]
"""Parameters: a flat dict keyed by parameter path (module FQN)."""
Updates = dict[str, Tensor]
"""Gradients or updates: keyed exactly like :data:`Params`."""
OptState = Any
"""An optimizer state: a pytree (NamedTuples, tuples, dicts) whose leaves are tensors."""
Schedule = Callable[[Tensor], Tensor]
"""Maps the int64 ``count`` tensor (applied updates so far) to a float32 0-d tensor."""
ScalarOrSchedule = float | Tensor | Schedule
"""A hyperparameter: a Python float, a 0-d tensor (mutable without recompiles) or a schedule."""
ReduceFn = Callable[[Tensor], Tensor]
"""All-reduce SUM across the ranks that each hold a shard of every parameter."""


class TransformInitFn(Protocol):
    """Build the initial state for ``params`` (shapes, dtypes and device follow ``params``)."""

    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    """Map ``(updates, state)`` to ``(new_updates, new_state)`` without mutating any input.

    ``extra`` carries keyword arguments that the training step passes to every transform; a
    transform reads the ones it knows and ignores the rest. Known keys:

    * ``reduce_fn`` (:data:`ReduceFn` or ``None``): under ZeRO the tensors may be 1-D zero-padded
      shards of each parameter; anything that needs a norm over a whole parameter or the whole
      model reduces its local partial sums of squares through it.
    """

    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]: ...


class InPlaceUpdateFn(Protocol):
    """Apply one step in place: mutate ``params`` and the moment tensors of ``state``.

    The caller donates ``params`` and ``state`` (as with JAX ``donate_argnums``): the returned
    state holds the same moment tensors, mutated, and a new ``count``. With ``found_inf`` (a float32
    0-d tensor, 0. or 1.) equal to 1, nothing is modified and ``count`` does not advance, without a
    host sync.
    """

    def __call__(
        self,
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState: ...


LearningRateFn = Callable[[OptState], Tensor]
"""Reads the learning rate the next update will use out of an optimizer state."""


class EmptyState(NamedTuple):
    """The state of a stateless transform: an empty NamedTuple, so it adds no pytree leaves."""


class GradientTransformation(NamedTuple):
    """A pure optimizer building block: ``init`` builds a state, ``update`` transforms updates.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(updates, state, params=None, **extra) -> (updates, new_state)``; pure.
    """

    init: TransformInitFn
    update: TransformUpdateFn


class Optimizer(NamedTuple):
    """A :class:`GradientTransformation` with a learning-rate reader and a fused in-place step.

    Built by the aliases (:func:`funczero.optim.adamw`, ...). ``init`` and ``update`` behave as in
    :class:`GradientTransformation` (an ``Optimizer`` can be passed to :func:`chain`).

    Attributes:
        init: ``init(params) -> state``.
        update: pure ``update(updates, state, params=None, **extra) -> (updates, new_state)``.
        learning_rate: ``learning_rate(state) -> Tensor``: the float32 0-d learning rate the next
            update will use (for metrics).
        update_: ``update_(grads, state, params, *, found_inf=None, reduce_fn=None) -> new_state``:
            the in-place fast path (see :class:`InPlaceUpdateFn`); agrees with ``update`` followed
            by :func:`apply_updates`.
    """

    init: TransformInitFn
    update: TransformUpdateFn
    learning_rate: LearningRateFn
    update_: InPlaceUpdateFn


def identity() -> GradientTransformation:
    """Return a transform that leaves updates unchanged.

    Example:
        >>> import torch
        >>> tx = identity()
        >>> tx.update({"w": torch.ones(1)}, tx.init({}))[0]["w"]
        tensor([1.])
    """

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del params, extra
        return updates, state

    return GradientTransformation(init_fn, update_fn)


def stateless(
    f: Callable[[Updates, Params | None], Updates],
) -> GradientTransformation:
    """Wrap a pure function ``f(updates, params) -> updates`` as a stateless transform.

    Args:
        f: Pure function of the updates and (possibly ``None``) params.

    Returns:
        A transform whose state is :class:`EmptyState`.

    Example:
        >>> import torch
        >>> neg = stateless(lambda u, p: {k: -v for k, v in u.items()})
        >>> neg.update({"w": torch.ones(1)}, neg.init({}))[0]["w"]
        tensor([-1.])
    """

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del extra
        return f(updates, params), state

    return GradientTransformation(init_fn, update_fn)


def chain(*transforms: GradientTransformation | Optimizer) -> GradientTransformation:
    """Compose transforms left to right; the state is the tuple of their states.

    Every ``extra`` keyword argument is passed to every member.

    Args:
        *transforms: Transforms (or optimizers) applied in order.

    Returns:
        The composed transform. Its state is ``tuple(t.init(params) for t in transforms)``, so leaf
        paths start with the member's index (``1/mu/<fqn>``).

    Example:
        >>> import torch
        >>> tx = chain(identity(), stateless(lambda u, p: {k: 2 * v for k, v in u.items()}))
        >>> tx.update({"w": torch.ones(1)}, tx.init({"w": torch.zeros(1)}))[0]["w"]
        tensor([2.])
    """
    for i, t in enumerate(transforms):
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise TypeError(
                f"chain: argument {i} is {type(t).__name__}, not a GradientTransformation; "
                "pass objects with init/update such as optim.scale_by_adam() or optim.adamw(1e-3)"
            )
    inits = tuple(t.init for t in transforms)
    updates_fns = tuple(t.update for t in transforms)

    def init_fn(params: Params) -> tuple[OptState, ...]:
        return tuple(fn(params) for fn in inits)

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        if len(state) != len(updates_fns):
            raise ValueError(
                f"chain: state has {len(state)} entries but the chain has {len(updates_fns)} "
                "transforms; the state was built by a different optimizer"
            )
        new_state = []
        for fn, s in zip(updates_fns, state):
            updates, s = fn(updates, s, params, **extra)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init_fn, update_fn)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates``, cast back to each parameter's dtype (pure).

    Args:
        params: Parameter tree.
        updates: Updates with the same structure (typically in fp32, or higher, precision).

    Returns:
        New parameters; the inputs are not modified.

    Example:
        >>> import torch
        >>> apply_updates({"w": torch.ones(2, dtype=torch.bfloat16)}, {"w": torch.ones(2)})["w"]
        tensor([2., 2.], dtype=torch.bfloat16)
    """
    return optree.tree_map(lambda p, u: (p + u).to(p.dtype), params, updates)
