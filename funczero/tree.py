"""Pytree helpers keyed by path.

A leaf's name is its path: top-level groups are joined with ``/`` and module FQNs keep their dots,
so the same string names a tensor in the state, in checkpoints, in metrics and in error messages
(``params/blocks.0.attn.qkv.weight``, ``opt_state/0/mu/blocks.0.attn.qkv.weight``).

Example:
    >>> import torch
    >>> from funczero import tree
    >>> tree.leaves_with_path({"a": {"w": torch.zeros(2)}, "b": torch.ones(1)})[0][0]
    'a/w'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

NAMESPACE = "funczero"

__all__ = [
    "NAMESPACE",
    "flatten",
    "leaves",
    "leaves_with_path",
    "map",
    "map_with_path",
    "path_str",
    "structure",
    "unflatten",
]


def path_str(path: tuple[Any, ...]) -> str:
    """Join an optree path into a ``/``-separated name (``("opt", 0, "mu", "w")`` -> ``opt/0/mu/w``)."""
    return "/".join(str(p) for p in path)


def leaves(tree: Any) -> list[Any]:
    """Return the leaves of ``tree`` (``None`` is not a leaf)."""
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """Flatten ``tree`` into leaves and a treespec."""
    return optree.tree_flatten(tree, namespace=NAMESPACE)


def unflatten(spec: optree.PyTreeSpec, leaves_: list[Any]) -> Any:
    """Inverse of :func:`flatten`."""
    return optree.tree_unflatten(spec, leaves_)


def structure(tree: Any) -> optree.PyTreeSpec:
    """Return the treespec of ``tree``."""
    return optree.tree_structure(tree, namespace=NAMESPACE)


def _entry_name(entry: Any) -> str:
    # NamedTuple and dataclass entries carry a field name; sequences and dicts an index or key.
    field = getattr(entry, "field", None)
    if isinstance(field, str):
        return field
    name = getattr(entry, "name", None)
    return name if isinstance(name, str) else str(entry.entry)


def leaves_with_path(tree: Any) -> list[tuple[str, Any]]:
    """Return ``[(path, leaf), ...]`` with paths joined by ``/`` (NamedTuple fields by name)."""
    accessors, leaves_, _ = optree.tree_flatten_with_accessor(tree, namespace=NAMESPACE)
    return [("/".join(_entry_name(e) for e in acc), leaf) for acc, leaf in zip(accessors, leaves_)]


def map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:  # noqa: A001 - mirrors optree/jax
    """Map ``fn`` over the leaves of ``tree`` (and matching leaves of ``rest``)."""
    return optree.tree_map(fn, tree, *rest, namespace=NAMESPACE)


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Map ``fn(path, leaf, *rest_leaves)`` over ``tree``; ``path`` is the ``/``-joined name.

    Example:
        >>> map_with_path(lambda path, x: f"{path}={x}", {"mu": {"w": 1}, "count": 0})
        {'mu': {'w': 'mu/w=1'}, 'count': 'count=0'}
    """
    return optree.tree_map_with_path(
        lambda p, *xs: fn(path_str(p), *xs), tree, *rest, namespace=NAMESPACE
    )


def tensor_bytes(tree: Any) -> int:
    """Total bytes held by the tensor leaves of ``tree``.

    Example:
        >>> tensor_bytes({"w": torch.zeros(3), "h": torch.zeros(4, dtype=torch.bfloat16), "n": 1})
        20
    """
    return sum(x.numel() * x.element_size() for x in leaves(tree) if isinstance(x, torch.Tensor))
