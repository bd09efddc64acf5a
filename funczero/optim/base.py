"""The optimizer contract: gradient transformations over flat parameter dicts.

A :class:`GradientTransformation` is a pair of pure functions, ``init(params) -> state`` and
``update(updates, state, params=None, **extra) -> (updates, state)``, with every hyperparameter
captured in a closure and every number that changes between steps kept in ``state``. States are
``NamedTuple`` pytrees of tensors: per-parameter fields are dicts keyed exactly like ``params``
(so a leaf path reads ``mu/blocks.0.attn.qkv.weight``) and scalars are 0-d tensors (``count`` is
int64 on the parameters' device).

Beyond the pure pair, a transform may carry in-place methods (``update_`` to step the parameters,
``transform_`` to rewrite the updates) and a ``learning_rate`` reader; :func:`funczero.optim.chain`
keeps the in-place path when its members have one, and
:func:`funczero.optim.in_place_unsupported_reason` names the member when it cannot.

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
    "InPlaceTransformFn",
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

    The caller donates ``params``, ``state`` and ``grads`` (as with JAX ``donate_argnums``): the
    returned state holds the same moment tensors, mutated, and a new ``count``; the gradient
    tensors may be overwritten (a chain's clipping scales them in place). With ``found_inf`` (a
    float32 0-d tensor, 0. or 1.) equal to 1, neither ``params`` nor the state is modified and
    ``count`` does not advance, without a host sync.
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


class InPlaceTransformFn(Protocol):
    """``update`` with its result written into the tensors of ``updates`` instead of new ones.

    The values left in ``updates`` and the returned state equal what ``update`` returns (to the
    tolerance the transform documents; bit for bit unless it says otherwise). ``updates`` and
    ``state`` are donated. With ``found_inf`` equal to 1 the returned state equals ``state`` (the
    updates then hold garbage that the caller must not apply).
    """

    def __call__(
        self,
        updates: Updates,
        state: OptState,
        params: Params | None = None,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState: ...


LearningRateFn = Callable[[OptState], Tensor]
"""Reads the learning rate the next update will use out of an optimizer state."""


class EmptyState(NamedTuple):
    """The state of a stateless transform: an empty NamedTuple, so it adds no pytree leaves."""


class GradientTransformation(NamedTuple):
    """The one optimizer contract: a pure ``init``/``update`` pair and optional in-place methods.

    Every transform, every alias and every :func:`~funczero.optim.chain` is one of these. Only
    ``init`` and ``update`` are required; the other fields are ``None`` when the transform does not
    have that capability (:func:`~funczero.optim.supports_in_place` and
    :func:`~funczero.optim.in_place_unsupported_reason` read them):

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(updates, state, params=None, **extra) -> (updates, new_state)``; pure.
        learning_rate: ``learning_rate(state) -> Tensor``, the float32 0-d learning rate the next
            update will use (for metrics), or ``None``.
        update_: the in-place step ``update_(grads, state, params, *, found_inf=None,
            reduce_fn=None) -> new_state`` (see :class:`InPlaceUpdateFn`): ``update`` followed by
            :func:`apply_updates`, written into the donated parameters and state; or ``None``.
        transform_: ``update`` written into the donated updates (see :class:`InPlaceTransformFn`),
            which lets a :func:`~funczero.optim.chain` that ends in an ``update_`` keep the
            in-place path; or ``None``.
        members: the composed transforms of a chain or a wrapper (:func:`~funczero.optim.masked`,
            :func:`~funczero.optim.partition`, :func:`~funczero.optim.MultiSteps`,
            :func:`~funczero.optim.apply_if_finite`); names them in error messages; else ``()``.

    Example:
        >>> import torch
        >>> from funczero import optim
        >>> opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
        >>> opt.update_ is not None and opt.learning_rate is not None
        True
        >>> optim.scale_by_adam().update_ is None
        True
    """

    init: TransformInitFn
    update: TransformUpdateFn
    learning_rate: LearningRateFn | None = None
    update_: InPlaceUpdateFn | None = None
    transform_: InPlaceTransformFn | None = None
    members: tuple[GradientTransformation, ...] = ()


Optimizer = GradientTransformation
"""A :class:`GradientTransformation` whose ``learning_rate`` and ``update_`` are set.

The aliases (:func:`funczero.optim.adamw`, ...) return one. It is the same class, not a subclass:
an optimizer composes with :func:`~funczero.optim.chain` like any transform.
"""


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

    def transform_(
        updates: Updates,
        state: OptState,
        params: Params | None = None,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        del updates, params, found_inf, reduce_fn
        return state

    return GradientTransformation(init_fn, update_fn, transform_=transform_)


def stateless(
    f: Callable[[Updates, Params | None], Updates],
) -> GradientTransformation:
    """Wrap a pure function ``f(updates, params) -> updates`` as a stateless transform.

    The result has no in-place ``transform_`` (``f`` returns new tensors), so a chain holding it
    takes the pure path.

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
