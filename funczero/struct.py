"""Frozen dataclasses that are pytrees (flax.struct in torch clothing).

Example:
    >>> import torch
    >>> from funczero import struct, tree
    >>> @struct.dataclass
    ... class Pair:
    ...     a: torch.Tensor
    ...     b: torch.Tensor
    >>> p = Pair(torch.zeros(1), torch.ones(1))
    >>> [name for name, _ in tree.leaves_with_path(p)]
    ['a', 'b']
    >>> p.replace(a=torch.ones(1)).a
    tensor([1.])
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import optree

from funczero.tree import NAMESPACE

T = TypeVar("T")

__all__ = ["dataclass", "field"]


def field(*, static: bool = False, **kwargs: Any) -> Any:
    """A dataclass field; ``static=True`` keeps it out of the leaves (in the treespec instead).

    Static fields hold small hashable metadata (a layout description), never tensors.
    """
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["static"] = static
    return dataclasses.field(metadata=metadata, **kwargs)


def dataclass(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass registered as a pytree node in the funczero namespace.

    Every field is a child (tensors or sub-trees); ``None`` fields are empty subtrees. The
    class gains ``replace(**changes)``. Equality is identity: comparing tensors elementwise
    is never what a state comparison means.
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    fields = dataclasses.fields(cls)
    names = tuple(f.name for f in fields if not f.metadata.get("static"))
    statics = tuple(f.name for f in fields if f.metadata.get("static"))

    def flatten(obj: Any) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[str, ...]]:
        children = tuple(getattr(obj, n) for n in names)
        return children, tuple(getattr(obj, n) for n in statics), names

    def unflatten(aux: tuple[Any, ...], children: Any) -> Any:
        return cls(**dict(zip(names, children)), **dict(zip(statics, aux)))

    optree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        path_entry_type=optree.GetAttrEntry,
        namespace=NAMESPACE,
    )

    def replace(self: Any, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    cls.replace = replace  # type: ignore[attr-defined]
    return cls
