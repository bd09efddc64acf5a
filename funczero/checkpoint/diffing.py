"""``diff``: per-tensor max absolute and relative differences between two checkpoints.

Tensors are compared by path on their global (unsharded) values, so checkpoints of different
world sizes and stages compare directly. Values stream in blocks (bounded memory). ``per_rank``
tensors (the RNG) are compared on rank 0's copy.

A reshard to another world size re-derives the RNG states, so ``diff(a, reshard(a))`` finds
``rng`` different; ``resharded=True`` compares exactly what a reshard must preserve.

Example:
    >>> import tempfile
    >>> from funczero.checkpoint import reshard, save
    >>> from funczero.testing.states import toy_state
    >>> a = save(tempfile.mkdtemp(), toy_state())
    >>> all(d.status == "equal" for d in diff(a, a))
    True
    >>> b = reshard(a, tempfile.mkdtemp(), world_size=2)
    >>> sorted({d.status for d in diff(a, b, resharded=True)})
    ['equal', 'ignored']
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from funczero.checkpoint.entry import TensorEntry
from funczero.checkpoint.index import read_index
from funczero.checkpoint.reader import BLOCK_ELEMS, ShardReader
from funczero.checkpoint.tags import resolve

__all__ = ["TensorDiff", "diff"]


@dataclasses.dataclass(frozen=True)
class TensorDiff:
    """How one tensor differs.

    Attributes:
        path: the tensor path.
        status: ``equal`` (equal values; NaN equals NaN), ``different``, ``only_a``, ``only_b``,
            ``shape`` (shapes differ; not compared) or ``ignored`` (not compared, as asked).
        max_abs: ``max |a - b|`` (0 when equal; ``inf`` where only one side is NaN).
        max_rel: ``max |a - b| / max(|a|, |b|)`` elementwise (0 where both are 0).
    """

    path: str
    status: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stream(reader: ShardReader, e: TensorEntry) -> Iterator[tuple[int, torch.Tensor]]:
    return reader.iter_range(e, 0, e.numel, BLOCK_ELEMS)


def _compare(
    ra: ShardReader, ea: TensorEntry, rb: ShardReader, eb: TensorEntry
) -> tuple[float, float]:
    max_abs = max_rel = 0.0
    it_b = _stream(rb, eb)
    pending = torch.empty(0, dtype=torch.float64)
    for _, xa in _stream(ra, ea):
        # The two sides are chunked differently (world sizes differ): re-block b to match a.
        while pending.numel() < xa.numel():
            pending = torch.cat([pending, next(it_b)[1].to(torch.float64)])
        x, y = xa.to(torch.float64), pending[: xa.numel()]
        pending = pending[xa.numel() :]
        d = torch.nan_to_num((x - y).abs(), nan=float("inf"))
        d = torch.where(x.isnan() & y.isnan(), 0.0, d)
        den = torch.maximum(x.abs(), y.abs())
        rel = torch.where(d == 0, 0.0, d / torch.where(den == 0, 1.0, den))
        if d.numel():
            max_abs = max(max_abs, float(d.max()))
            max_rel = max(max_rel, float(torch.nan_to_num(rel, nan=float("inf")).max()))
    return max_abs, max_rel


def _ignored(
    path: str, ea: TensorEntry | None, eb: TensorEntry | None, patterns: list[str], rng: bool
) -> bool:
    if any(fnmatch.fnmatchcase(path, p) for p in patterns):
        return True
    return rng and any(e is not None and e.kind == "rng" for e in (ea, eb))


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    tag_a: str | None = None,
    tag_b: str | None = None,
    ignore: Iterable[str] = (),
    resharded: bool = False,
) -> list[TensorDiff]:
    """Compare every tensor of checkpoints ``a`` and ``b`` (roots or tag directories).

    Args:
        ignore: glob patterns of tensor paths not to compare (``"rng"``, ``"opt_state/*"``);
            they are reported with status ``ignored``.
        resharded: compare what a reshard of ``a`` into ``b`` must preserve: every value, but
            not the RNG states (kind ``rng``) when the world sizes differ, since resharding
            re-derives them per new rank (see :func:`~funczero.checkpoint.reshard`).

    Returns:
        One :class:`TensorDiff` per path in either checkpoint, ``a``'s order first.
    """
    da, db = resolve(a, tag_a), resolve(b, tag_b)
    ia, ib = read_index(da), read_index(db)
    patterns = list(ignore)
    rng = resharded and ia.world_size != ib.world_size
    out: list[TensorDiff] = []
    with ShardReader(da, ia) as ra, ShardReader(db, ib) as rb:
        for path in list(ia.tensors) + [p for p in ib.tensors if p not in ia.tensors]:
            ea, eb = ia.tensors.get(path), ib.tensors.get(path)
            common: dict[str, Any] = {
                "shape_a": ea.shape if ea else None,
                "shape_b": eb.shape if eb else None,
                "dtype_a": ea.dtype_name if ea else None,
                "dtype_b": eb.dtype_name if eb else None,
            }
            if _ignored(path, ea, eb, patterns, rng):
                out.append(TensorDiff(path, "ignored", **common))
            elif ea is None or eb is None:
                out.append(TensorDiff(path, "only_a" if eb is None else "only_b", **common))
            elif ea.shape != eb.shape:
                out.append(TensorDiff(path, "shape", **common))
            else:
                max_abs, max_rel = _compare(ra, ea, rb, eb)
                status = "equal" if max_abs == 0.0 else "different"
                out.append(TensorDiff(path, status, max_abs, max_rel, **common))
    return out
