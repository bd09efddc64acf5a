"""Weight-decay masks: which parameters are decayed, decided by canonical parameter name.

A mask is one of

* a predicate ``mask(name, shape) -> bool`` (True: decay), given each parameter's **global**
  shape, such as :func:`no_decay_for_norms_and_biases`;
* a set (any collection) of the names to decay;
* a dict ``{name: bool}`` with an entry for every parameter.

Under ZeRO stages 1-3 the optimizer sees 1-D shards of every parameter, keyed by the parameter's
canonical name, so a name-based mask works unchanged, but a predicate must be given the global
shapes: pass ``shapes=plan.spec.shapes`` (or ``{n: p.shape for n, p in
model.named_parameters()}``) next to it. A decision is made once per name and reused every step.

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

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["DecayMask", "WeightDecayMask", "no_decay_for_norms_and_biases"]

WeightDecayMask = Callable[[str, torch.Size], bool] | Collection[str] | Mapping[str, bool]
"""A predicate ``(name, global_shape) -> decay?``, a collection of names to decay, or a dict."""


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


class DecayMask:
    """A :data:`WeightDecayMask` resolved by parameter name, for the pure and in-place paths.

    Args:
        who: The builder's name, for error messages (``"adamw"``).
        mask: The mask (see the module docstring).
        shapes: Global shapes for a predicate ``mask``; ``None`` means the tensors given to the
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
        self.who = who
        self._predicate: Callable[[str, torch.Size], bool] | None = None
        self._table: dict[str, bool] | None = None
        self._names: frozenset[str] | None = None
        if isinstance(mask, (str, bytes)):
            raise TypeError(
                f"{who}: mask={mask!r} is a string; pass a set of names such as {{{mask!r}}}, a "
                "dict {name: bool} or a predicate (name, shape) -> bool"
            )
        if isinstance(mask, Mapping):
            bad = {k: v for k, v in mask.items() if not isinstance(v, bool)}
            if bad:
                raise TypeError(f"{who}: mask values must be True/False, got {_head(bad)}")
            self._table = dict(mask)
        elif callable(mask):
            self._predicate = mask
        elif isinstance(mask, Collection):
            self._names = frozenset(mask)
        else:
            raise TypeError(
                f"{who}: mask={mask!r} must be a predicate (name, shape) -> bool, a set of the "
                "names to decay or a dict {name: bool}"
            )
        if shapes is not None and self._predicate is None:
            raise ValueError(
                f"{who}: shapes are only read by a predicate mask; a mask of names needs none"
            )
        self._shapes = None if shapes is None else {k: torch.Size(v) for k, v in shapes.items()}
        self._memo: dict[object, bool] = {}

    def __call__(self, name: str, tensor: Tensor) -> bool:
        """Whether parameter ``name`` (this rank's ``tensor`` of it) is decayed."""
        key: object = (
            name if self._shapes is not None or self._predicate is None else (name, tensor.shape)
        )
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._decide(name, tensor)
        return found

    def _decide(self, name: str, tensor: Tensor) -> bool:
        if self._names is not None:
            return name in self._names
        if self._table is not None:
            if name not in self._table:
                raise KeyError(
                    f"{self.who}: the weight-decay mask has no entry for parameter {name!r}; "
                    "give every parameter True or False, or pass a predicate"
                )
            return self._table[name]
        assert self._predicate is not None
        shape = tensor.shape
        if self._shapes is not None:
            if name not in self._shapes:
                raise KeyError(
                    f"{self.who}: shapes has no entry for parameter {name!r}; pass the global "
                    "shape of every parameter (e.g. plan.spec.shapes)"
                )
            shape = self._shapes[name]
        decided = self._predicate(name, shape)
        if not isinstance(decided, bool):
            raise TypeError(
                f"{self.who}: the mask predicate returned {decided!r} for {name!r}; it must "
                "return True (decay) or False"
            )
        return decided

    def check(self, params: Mapping[str, Tensor]) -> None:
        """Validate against the parameters an optimizer is initialised with, then warm the memo.

        Raises for a name in the mask that is no parameter (a typo would silently change which
        parameters are decayed) and for a global shape that cannot hold the tensor.
        """
        named = self._names if self._names is not None else self._table
        if named is not None:
            unknown = sorted(set(named) - set(params))
            if unknown:
                raise KeyError(
                    f"{self.who}: the weight-decay mask names {_head(unknown)}, which are not "
                    f"among the optimizer's parameters ({_head(sorted(params))}); fix the names "
                    "(leave frozen parameters out)"
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
        for name, p in params.items():
            self(name, p)


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
