"""Parameter groups: a transform on some parameters (:func:`masked`), one per group (:func:`partition`).

torch.optim's parameter groups, optax-style: :func:`partition` gives each group of parameters its
own transform (an optimizer with its own learning rate or weight decay, or :func:`set_to_zero` to
freeze it) and :func:`masked` applies one transform to the selected parameters and passes the
others' updates through. Groups are decided by canonical parameter name, on **global** shapes
(:mod:`funczero.optim.masks`: pass ``shapes=plan.spec.shapes`` with a shape rule), once, at
``init``; so at ZeRO stage 3, where a rank holds 1-D shards, every rank forms the same groups.

Both keep the in-place path: each group's ``update_`` (the fused kernels) or ``transform_`` runs on
the group's own tensors, so ``partition({"decay": adamw(lr, weight_decay=0.1), "no_decay":
adamw(lr, weight_decay=0.0)}, labels)`` is two fused AdamW calls, as torch.optim with two groups.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> params = {"head.weight": torch.ones(2, 2), "body.weight": torch.ones(2, 2)}
    >>> opt = optim.partition(
    ...     {"head": optim.sgd(0.1), "body": optim.sgd(0.01)},
    ...     lambda name, shape: name.split(".")[0])
    >>> state = opt.update_({k: torch.ones_like(v) for k, v in params.items()},
    ...                     opt.init(params), params)
    >>> params["head.weight"][0, 0], params["body.weight"][0, 0]
    (tensor(0.9000), tensor(0.9900))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funczero.optim._common import keys_of, state_on
from funczero.optim.base import (
    EmptyState,
    GradientTransformation,
    InPlaceTransformFn,
    InPlaceUpdateFn,
    LearningRateFn,
    OptState,
    Params,
    ReduceFn,
    Updates,
)
from funczero.optim.inplace import apply_updates_, has_in_place_step, step_
from funczero.optim.masks import ParamLabels, ParamMask, ParamRule

__all__ = ["MaskedState", "PartitionState", "masked", "partition", "set_to_zero"]


class MaskedState(NamedTuple):
    """State of :func:`masked`.

    Attributes:
        inner_state: The inner transform's state, over the selected parameters only.
    """

    inner_state: OptState


class PartitionState(NamedTuple):
    """State of :func:`partition`.

    Attributes:
        inner_states: Each group's state by label, over that group's parameters only (leaf paths
            read ``inner_states/<label>/0/mu/<name>``).
    """

    inner_states: dict[str, OptState]


def _check_transform(who: str, tx: Any, what: str) -> None:
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"{who}: {what} is {type(tx).__name__}, not a GradientTransformation; pass objects "
            "with init/update such as optim.adamw(1e-3) or optim.set_to_zero()"
        )


def _subset(tree: Mapping[str, Tensor] | None, keys: Sequence[str]) -> Params | None:
    return None if tree is None else dict(zip(keys, keys_of(tree, keys)))


def set_to_zero() -> GradientTransformation:
    """Replace every update with zeros: the parameters it is given do not move (freezing).

    Use it as a group of :func:`partition`. Its ``update_`` leaves the parameters untouched
    (no pass over them); its ``transform_`` zeroes the updates in place.

    Returns:
        A stateless transform.

    Example:
        >>> import torch
        >>> tx = set_to_zero()
        >>> tx.update({"w": torch.ones(2)}, tx.init({}))[0]["w"]
        tensor([0., 0.])
    """

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del params, extra
        return {k: torch.zeros_like(u) for k, u in updates.items()}, state

    def transform_(
        updates: Updates,
        state: OptState,
        params: Params | None = None,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        del params, found_inf, reduce_fn
        if updates:
            torch._foreach_zero_(list(updates.values()))
        return state

    def update_(
        grads: Updates,
        state: OptState,
        params: Params,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        # params + 0 is params (except -0.0, which the pure path's addition turns into +0.0)
        del grads, params, found_inf, reduce_fn
        return state

    return GradientTransformation(init_fn, update_fn, update_=update_, transform_=transform_)


def masked(
    inner: GradientTransformation,
    mask: ParamMask,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> GradientTransformation:
    """Apply ``inner`` to the parameters ``mask`` selects; pass the others' updates through.

    optax semantics: ``inner`` is initialised on, and sees, the selected parameters only; the
    updates of the others come out as they went in. So ``masked`` belongs *inside* a chain
    (``chain(masked(add_decayed_weights(wd), mask), ...)``). As the last member it would add the
    unselected parameters' raw gradients to them; to give a group another optimizer or freeze
    it, use :func:`partition` (with :func:`set_to_zero`).

    The result has ``transform_`` when ``inner`` has one, and ``update_`` when ``inner`` has
    ``update_`` or ``transform_`` (``inner`` steps its parameters in place, the others get their
    updates added in place), so a chain holding it keeps the fused path.

    Args:
        inner: The transform (or optimizer) for the selected parameters.
        mask: Which parameters (:data:`~funczero.optim.masks.ParamMask`): a predicate
            ``(name, global_shape) -> bool``, a function ``tree -> {name: bool}``, a set of
            names or a dict ``{name: bool}``.
        shapes: Global parameter shapes for a shape rule when the optimizer holds ZeRO shards
            (``plan.spec.shapes``); ``None`` reads the tensors' own shapes.

    Returns:
        A transform with state :class:`MaskedState`.

    Example:
        >>> import torch
        >>> from funczero import optim
        >>> tx = masked(optim.scale(10.0), optim.no_decay_for_norms_and_biases)
        >>> p = {"w": torch.zeros(1, 2), "b": torch.zeros(2)}
        >>> out, _ = tx.update({"w": torch.ones(1, 2), "b": torch.ones(2)}, tx.init(p), p)
        >>> out["w"], out["b"]
        (tensor([[10., 10.]]), tensor([1., 1.]))
    """
    _check_transform("masked", inner, "inner")
    rule = ParamRule("masked", mask, shapes, arg="mask")

    def selected(updates: Updates) -> tuple[list[str], list[str]]:
        decided = rule.resolve(updates)
        on = [k for k, v in decided.items() if v]
        return on, [k for k, v in decided.items() if not v]

    def init_fn(params: Params) -> MaskedState:
        keys = [k for k, v in rule.check(params).items() if v]
        return MaskedState(state_on(inner.init(_subset(params, keys)), params))

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        on, _ = selected(updates)
        new, inner_state = inner.update(
            _subset(updates, on), state.inner_state, _subset(params, on), **extra
        )
        return {k: new.get(k, u) for k, u in updates.items()}, MaskedState(inner_state)

    inner_transform_ = inner.transform_
    transform_: InPlaceTransformFn | None = None
    if inner_transform_ is not None:

        def transform_(
            updates: Updates,
            state: OptState,
            params: Params | None = None,
            *,
            found_inf: Tensor | None = None,
            reduce_fn: ReduceFn | None = None,
        ) -> OptState:
            on, _ = selected(updates)
            return MaskedState(
                inner_transform_(
                    _subset(updates, on), state.inner_state, _subset(params, on),
                    found_inf=found_inf, reduce_fn=reduce_fn,
                )
            )  # fmt: skip

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
            on, off = selected(grads)
            sub = _subset(grads, on)
            assert sub is not None
            inner_state = step_(
                inner, sub, state.inner_state, _subset(params, on), found_inf, reduce_fn
            )
            apply_updates_(_subset(params, off), _subset(grads, off), found_inf)
            return MaskedState(inner_state)

    read = inner.learning_rate
    learning_rate: LearningRateFn | None = None
    if read is not None:

        def learning_rate(state: OptState) -> Tensor:
            return read(state.inner_state)

    return GradientTransformation(
        init_fn, update_fn, learning_rate, update_, transform_, members=(inner,)
    )


def partition(
    transforms: Mapping[str, GradientTransformation],
    labels: ParamLabels,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> GradientTransformation:
    """Give each group of parameters its own transform: torch.optim's parameter groups.

    ``labels`` puts every parameter in a group; ``transforms[label]`` is initialised on, and
    updates, that group's parameters only. Per-group learning rates, weight decays or whole
    optimizers are per-group transforms::

        partition({"decay": adamw(lr, weight_decay=0.1),
                   "no_decay": adamw(lr, weight_decay=0.0),
                   "head": adamw(lambda count: 10 * lr(count)),   # 10x the rate
                   "frozen": set_to_zero()}, labels)

    The result has ``update_`` when every group's transform has ``update_`` or ``transform_`` (an
    alias's fused kernel runs once per group, as torch.optim's once per group), and
    ``transform_`` when every group's has one. Groups run in the order of ``transforms``, the same
    on every rank, so collectives inside them (a per-group clip) line up. A label no parameter
    has is allowed (its transform sees an empty tree); a parameter whose label has no transform
    is an error at ``init``.

    Args:
        transforms: Transform (or optimizer) by group label.
        labels: Each parameter's label (:data:`~funczero.optim.masks.ParamLabels`): a function
            ``(name, global_shape) -> label``, a function ``tree -> {name: label}`` or a dict
            ``{name: label}``.
        shapes: Global parameter shapes for a shape rule when the optimizer holds ZeRO shards
            (``plan.spec.shapes``); ``None`` reads the tensors' own shapes.

    Returns:
        A transform with state :class:`PartitionState`; ``learning_rate`` reads the first group
        (in ``transforms``' order) whose transform reports one.

    Example:
        >>> import torch
        >>> from funczero import optim
        >>> opt = partition({"matrix": optim.adamw(0.1, weight_decay=0.5),
        ...                  "vector": optim.adamw(0.1, weight_decay=0.0)},
        ...                 lambda name, shape: "matrix" if len(shape) >= 2 else "vector")
        >>> p = {"fc.weight": torch.ones(1, 1), "fc.bias": torch.ones(1)}
        >>> _ = opt.update_({k: torch.zeros_like(v) for k, v in p.items()}, opt.init(p), p)
        >>> p["fc.weight"], p["fc.bias"]
        (tensor([[0.9500]]), tensor([1.]))
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError(
            f"partition: transforms={transforms!r} must be a non-empty dict {{label: transform}}, "
            "e.g. {'decay': optim.adamw(1e-3), 'no_decay': optim.adamw(1e-3, weight_decay=0.0)}"
        )
    for label, tx in transforms.items():
        if not isinstance(label, str) or not label or "/" in label:
            raise TypeError(
                f"partition: label {label!r} must be a non-empty string without '/' (labels "
                "name state entries and checkpoint paths)"
            )
        _check_transform("partition", tx, f"transforms[{label!r}]")
    groups_txs = dict(transforms)
    rule = ParamRule("partition", labels, shapes, arg="labels", labels=True)

    def groups(decided: Mapping[str, str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {label: [] for label in groups_txs}
        for name, label in decided.items():
            if label not in out:
                raise KeyError(
                    f"partition: parameter {name!r} has label {label!r}, which has no transform "
                    f"(labels with one: {sorted(groups_txs)}); add transforms[{label!r}] or fix "
                    "the labels"
                )
            out[label].append(name)
        return out

    def check_state(state: OptState) -> None:
        if set(state.inner_states) != set(groups_txs):
            raise ValueError(
                f"partition: the state has groups {sorted(state.inner_states)} but the "
                f"transforms are {sorted(groups_txs)}; the state was built by another optimizer"
            )

    def init_fn(params: Params) -> PartitionState:
        by_label = groups(rule.check(params))
        return PartitionState({
            label: state_on(tx.init(_subset(params, by_label[label])), params)
            for label, tx in groups_txs.items()
        })  # fmt: skip

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        check_state(state)
        by_label = groups(rule.resolve(updates))
        new: dict[str, Tensor] = {}
        inner_states = {}
        for label, tx in groups_txs.items():
            keys = by_label[label]
            out, inner_states[label] = tx.update(
                _subset(updates, keys), state.inner_states[label], _subset(params, keys), **extra
            )
            new.update(out)
        return {k: new[k] for k in updates}, PartitionState(inner_states)

    transform_: InPlaceTransformFn | None = None
    if all(tx.transform_ is not None for tx in groups_txs.values()):

        def transform_(
            updates: Updates,
            state: OptState,
            params: Params | None = None,
            *,
            found_inf: Tensor | None = None,
            reduce_fn: ReduceFn | None = None,
        ) -> OptState:
            check_state(state)
            by_label = groups(rule.resolve(updates))
            return PartitionState({
                label: tx.transform_(
                    _subset(updates, by_label[label]), state.inner_states[label],
                    _subset(params, by_label[label]), found_inf=found_inf, reduce_fn=reduce_fn,
                )
                for label, tx in groups_txs.items()
            })  # fmt: skip

    update_: InPlaceUpdateFn | None = None
    if all(has_in_place_step(tx) for tx in groups_txs.values()):

        def update_(
            grads: Updates,
            state: OptState,
            params: Params,
            *,
            found_inf: Tensor | None = None,
            reduce_fn: ReduceFn | None = None,
        ) -> OptState:
            check_state(state)
            by_label = groups(rule.resolve(grads))
            inner_states = {}
            for label, tx in groups_txs.items():
                keys = by_label[label]
                sub = _subset(grads, keys)
                assert sub is not None
                inner_states[label] = step_(
                    tx, sub, state.inner_states[label], _subset(params, keys), found_inf,
                    reduce_fn,
                )  # fmt: skip
            return PartitionState(inner_states)

    return GradientTransformation(
        init_fn,
        update_fn,
        _first_learning_rate(groups_txs),
        update_,
        transform_,
        members=tuple(groups_txs.values()),
    )


def _first_learning_rate(txs: Mapping[str, GradientTransformation]) -> LearningRateFn | None:
    for label, tx in txs.items():
        read = tx.learning_rate
        if read is not None:

            def learning_rate(
                state: OptState, read: LearningRateFn = read, label: str = label
            ) -> Tensor:
                return read(state.inner_states[label])

            return learning_rate
    return None
