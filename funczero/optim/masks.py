"""Per-parameter decisions by canonical name, on global shapes: masks and group labels.

A **mask** says which parameters a transform acts on (weight decay, :func:`~funczero.optim.masked`);
**labels** put each parameter in a named group (:func:`~funczero.optim.partition`). Either is

* a predicate ``rule(name, shape)`` (two arguments), given the parameter's **global** shape,
  such as :func:`no_decay_for_norms_and_biases`;
* a function of the whole tree ``rule(tree) -> {name: decision}`` (one argument, optax's form):
  ``tree`` maps every name to a tensor on the meta device with the parameter's global shape and
  dtype, so ``p.ndim`` and ``p.shape`` read the global values and nothing is allocated;
* a dict ``{name: decision}`` with an entry for every parameter;
* for a mask only, a set (any collection) of the selected names.

A mask's decisions are ``True``/``False``; labels are non-empty strings without ``/`` (they name
state entries, and so checkpoint paths).

Under ZeRO stages 1-3 the optimizer sees 1-D shards of every parameter, keyed by the parameter's
canonical name, so a rule by name works unchanged, but a shape rule must be given the global
shapes: pass ``shapes=plan.spec.shapes`` (or ``{n: p.shape for n, p in
model.named_parameters()}``) next to it. Every rank then makes the same decisions, so the groups,
their states and their collectives agree across ranks. A decision is made once per name (at
``init``) and reused every step.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> opt = optim.adamw(0.1, weight_decay=0.5, mask=optim.no_decay_for_norms_and_biases)
    >>> params = {"fc.weight": torch.ones(1, 1), "fc.bias": torch.ones(1)}
    >>> state = opt.update_({k: torch.zeros_like(v) for k, v in params.items()},
    ...                     opt.init(params), params)
    >>> params["fc.weight"], params["fc.bias"]   # 1 * (1 - 0.1 * 0.5); the bias is not decayed
    (tensor([[0.9500]]), tensor([1.]))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DecayMask",
    "ParamLabels",
    "ParamMask",
    "ParamRule",
    "WeightDecayMask",
    "no_decay_for_norms_and_biases",
]

ParamMask = (
    Callable[[str, torch.Size], bool]
    | Callable[[dict[str, Tensor]], Mapping[str, bool]]
    | Collection[str]
    | Mapping[str, bool]
)
"""A predicate ``(name, global_shape) -> bool``, a function ``tree -> {name: bool}``, a collection
of the selected names, or a dict ``{name: bool}``."""
WeightDecayMask = ParamMask
"""A :data:`ParamMask` that selects the parameters to decay."""
ParamLabels = (
    Callable[[str, torch.Size], str]
    | Callable[[dict[str, Tensor]], Mapping[str, str]]
    | Mapping[str, str]
)
"""A function ``(name, global_shape) -> label``, a function ``tree -> {name: label}`` or a dict
``{name: label}``."""


def no_decay_for_norms_and_biases(name: str, shape: torch.Size) -> bool:
    """Decay parameters with at least two dimensions; leave 0-d and 1-D ones undecayed.

    This is the rule of nanoGPT, Hugging Face's Trainer and torchtitan: biases and
    LayerNorm/RMSNorm weights are 1-D and are not decayed; matrices, including embeddings, are.
    To exclude embeddings too, combine it with their names::

        mask = lambda name, shape: no_decay_for_norms_and_biases(name, shape) and "wte" not in name

    Args:
        name: Canonical parameter name (unused: the rule is by shape).
        shape: The parameter's global (unsharded) shape.

    Returns:
        True when the parameter should be decayed.

    Example:
        >>> import torch
        >>> no_decay_for_norms_and_biases("ln_f.weight", torch.Size([768]))
        False
        >>> no_decay_for_norms_and_biases("wte.weight", torch.Size([50304, 768]))
        True
    """
    del name
    return len(shape) >= 2


def _takes_the_tree(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a function of the whole tree (one required positional argument)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: the per-parameter form
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in sig.parameters.values() if p.kind in kinds]
    variadic = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    return len(positional) == 1 and not variadic


class ParamRule:
    """A mask or labels (see the module docstring), resolved by parameter name.

    Args:
        who: The builder's name, for error messages (``"masked"``).
        rule: The mask or labels.
        shapes: Global shapes for a shape rule (predicate or tree function); ``None`` means the
            tensors given to the optimizer are whole parameters (not ZeRO shards).
        arg: The argument's name in the builder (``"mask"``, ``"labels"``), for error messages.
        labels: Decisions are group labels (strings) instead of ``True``/``False``.
        noun: How error messages call the rule (default: ``"the <arg>"``).

    Example:
        >>> import torch
        >>> rule = ParamRule("partition", lambda name, shape: "matrix" if len(shape) > 1 else "vector",
        ...                  {"w": (2, 2), "b": (2,)}, arg="labels", labels=True)
        >>> rule.resolve({"w": torch.zeros(4), "b": torch.zeros(2)})   # ZeRO shards: 1-D
        {'w': 'matrix', 'b': 'vector'}
    """

    def __init__(
        self,
        who: str,
        rule: Any,
        shapes: Mapping[str, Sequence[int]] | None,
        *,
        arg: str = "mask",
        labels: bool = False,
        noun: str | None = None,
    ) -> None:
        self.who, self.arg, self.labels = who, arg, labels
        self.noun = noun if noun is not None else f"the {arg}"
        self._predicate: Callable[[str, torch.Size], Any] | None = None
        self._tree_fn: Callable[[dict[str, Tensor]], Mapping[str, Any]] | None = None
        self._table: dict[str, Any] | None = None
        self._names: frozenset[str] | None = None
        if labels:
            forms = (
                "a dict {name: label}, a function (name, shape) -> label or a function "
                "tree -> {name: label}"
            )
        else:
            forms = (
                "a predicate (name, shape) -> bool, a function tree -> {name: bool}, a set of "
                "the selected names or a dict {name: bool}"
            )
        if isinstance(rule, (str, bytes)):
            one = f"{{{rule!r}: 'group'}}" if labels else f"{{{rule!r}}}"
            raise TypeError(f"{who}: {arg}={rule!r} is a string; pass {forms} (one name: {one})")
        if isinstance(rule, Mapping):
            bad = {k: v for k, v in rule.items() if not self._valid(v)}
            if bad:
                raise TypeError(f"{who}: {arg} values must be {self._expected}, got {_head(bad)}")
            self._table = dict(rule)
        elif callable(rule):
            if _takes_the_tree(rule):
                self._tree_fn = rule
            else:
                self._predicate = rule
        elif not labels and isinstance(rule, Collection):
            self._names = frozenset(rule)
        else:
            raise TypeError(f"{who}: {arg}={rule!r} must be {forms}")
        if shapes is not None and self._predicate is None and self._tree_fn is None:
            raise ValueError(
                f"{who}: shapes are only read by a predicate {arg} (or a function of the tree); "
                f"a {arg} given by name needs none"
            )
        self._shapes = None if shapes is None else {k: torch.Size(v) for k, v in shapes.items()}
        self._memo: dict[object, Any] = {}

    @property
    def _expected(self) -> str:
        return "non-empty strings without '/'" if self.labels else "True/False"

    def _valid(self, value: Any) -> bool:
        if self.labels:
            return isinstance(value, str) and bool(value) and "/" not in value
        return isinstance(value, bool)

    def _key(self, name: str, tensor: Tensor) -> object:
        by_name = self._shapes is not None or (self._predicate is None and self._tree_fn is None)
        return name if by_name else (name, tensor.shape)

    def __call__(self, name: str, tensor: Tensor) -> Any:
        """The decision for parameter ``name`` (this rank's ``tensor`` of it)."""
        key = self._key(name, tensor)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._decide({name: tensor})[name]
        return found

    def resolve(self, tree: Mapping[str, Tensor]) -> dict[str, Any]:
        """The decision for every parameter of ``tree``, in ``tree``'s order."""
        out: dict[str, Any] = {}
        missing: dict[str, Tensor] = {}
        for name, tensor in tree.items():
            found = self._memo.get(self._key(name, tensor))
            if found is None:
                missing[name] = tensor
            else:
                out[name] = found
        if missing:
            decided = self._decide(missing)
            for name, tensor in missing.items():
                self._memo[self._key(name, tensor)] = out[name] = decided[name]
            out = {name: out[name] for name in tree}
        return out

    def _global_shape(self, name: str, tensor: Tensor) -> torch.Size:
        if self._shapes is None:
            return tensor.shape
        if name not in self._shapes:
            raise KeyError(
                f"{self.who}: shapes has no entry for parameter {name!r}; pass the global "
                "shape of every parameter (e.g. plan.spec.shapes)"
            )
        return self._shapes[name]

    def _decide(self, tree: Mapping[str, Tensor]) -> dict[str, Any]:
        if self._names is not None:
            return {name: name in self._names for name in tree}
        if self._table is not None:
            for name in tree:
                if name not in self._table:
                    values = "a label" if self.labels else "True or False"
                    raise KeyError(
                        f"{self.who}: {self.noun} has no entry for parameter {name!r}; give "
                        f"every parameter {values}, or pass a function"
                    )
            return {name: self._table[name] for name in tree}
        if self._predicate is not None:
            out = {}
            for name, tensor in tree.items():
                decided = self._predicate(name, self._global_shape(name, tensor))
                if not self._valid(decided):
                    raise TypeError(
                        f"{self.who}: the {self.arg} predicate returned {decided!r} for {name!r}; "
                        f"it must return {self._expected_one}"
                    )
                out[name] = decided
            return out
        assert self._tree_fn is not None
        return self._decide_tree(tree)

    @property
    def _expected_one(self) -> str:
        if self.labels:
            return "a non-empty string without '/'"
        return "True (decay) or False" if "decay" in self.noun else "True or False"

    def _decide_tree(self, tree: Mapping[str, Tensor]) -> dict[str, Any]:
        assert self._tree_fn is not None
        views = {
            name: torch.empty(self._global_shape(name, t), dtype=t.dtype, device="meta")
            for name, t in tree.items()
        }
        decided = self._tree_fn(views)
        if not isinstance(decided, Mapping):
            raise TypeError(
                f"{self.who}: the {self.arg} function returned a {type(decided).__name__}; it "
                "must return a dict {name: " + ("label" if self.labels else "bool") + "}"
            )
        missing = [n for n in tree if n not in decided]
        unknown = [n for n in decided if n not in tree]
        if missing or unknown:
            raise KeyError(
                f"{self.who}: the {self.arg} function must return an entry for exactly the "
                f"parameters it is given; missing: {_head(missing)}, unknown: {_head(unknown)}"
            )
        bad = {n: v for n, v in decided.items() if not self._valid(v)}
        if bad:
            raise TypeError(
                f"{self.who}: the {self.arg} function's values must be {self._expected}, got "
                f"{_head(bad)}"
            )
        return {name: decided[name] for name in tree}

    def check(self, params: Mapping[str, Tensor]) -> dict[str, Any]:
        """Validate against the parameters a transform is initialised with; decide them all.

        Raises for a name in the rule that is no parameter (a typo would silently change the
        decisions) and for a global shape that cannot hold the tensor.

        Returns:
            The decision for every parameter, in ``params``' order.
        """
        named = self._names if self._names is not None else self._table
        if named is not None:
            unknown = sorted(set(named) - set(params))
            if unknown:
                raise KeyError(
                    f"{self.who}: {self.noun} names {_head(unknown)}, which are not among the "
                    f"optimizer's parameters ({_head(sorted(params))}); fix the names (leave "
                    "frozen parameters out)"
                )
        if self._shapes is not None:
            for name, p in params.items():
                shape = self._shapes.get(name)
                if (
                    shape is not None
                    and p.shape != shape
                    and not (p.dim() == 1 and p.numel() <= shape.numel())
                ):
                    raise ValueError(
                        f"{self.who}: shapes[{name!r}]={tuple(shape)} cannot be the global shape "
                        f"of a parameter held as a tensor of shape {tuple(p.shape)}; pass the "
                        "unsharded shapes (e.g. plan.spec.shapes)"
                    )
        return self.resolve(params)


class DecayMask(ParamRule):
    """A :data:`WeightDecayMask` resolved by parameter name, for the pure and in-place paths.

    Args:
        who: The builder's name, for error messages (``"adamw"``).
        mask: The mask (see the module docstring).
        shapes: Global shapes for a shape mask; ``None`` means the tensors given to the
            optimizer are whole parameters (not ZeRO shards).

    Example:
        >>> import torch
        >>> m = DecayMask("adamw", {"w"}, None)
        >>> m("w", torch.zeros(3)), m("b", torch.zeros(3))
        (True, False)
    """

    def __init__(
        self,
        who: str,
        mask: WeightDecayMask,
        shapes: Mapping[str, Sequence[int]] | None,
    ) -> None:
        super().__init__(who, mask, shapes, arg="mask", noun="the weight-decay mask")


def decay_mask(
    who: str, mask: WeightDecayMask | DecayMask | None, shapes: Mapping[str, Sequence[int]] | None
) -> DecayMask | None:
    """Resolve the ``mask``/``shapes`` arguments of a builder (``None``: decay everything)."""
    if isinstance(mask, DecayMask):
        if shapes is not None:
            raise ValueError(f"{who}: pass shapes to the DecayMask, not next to it")
        return mask
    if mask is None:
        if shapes is not None:
            raise ValueError(f"{who}: shapes are only read by a predicate mask; pass mask=...")
        return None
    return DecayMask(who, mask, shapes)


def _head(items: object, n: int = 5) -> str:
    seq = list(items.items() if isinstance(items, Mapping) else items)  # type: ignore[attr-defined]
    more = f" and {len(seq) - n} more" if len(seq) > n else ""
    return f"{seq[:n]}{more}"
