"""``diff``: per-tensor max absolute and relative differences between two checkpoints.

Tensors are compared by path on their global (unsharded) values, so checkpoints of different
world sizes and stages compare directly. Values stream in blocks (bounded memory).

Example:
    >>> import tempfile
    >>> from funczero.checkpoint import save
    >>> from funczero.testing.states import toy_state
    >>> a = save(tempfile.mkdtemp(), toy_state())
    >>> all(d.status == "equal" for d in diff(a, a))
    True
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from funczero.checkpoint.index import Index, TensorEntry, read_index
from funczero.checkpoint.reader import BLOCK_ELEMS, ShardReader
from funczero.checkpoint.tags import resolve

__all__ = ["TensorDiff", "diff"]


@dataclasses.dataclass(frozen=True)
class TensorDiff:
    """How one tensor differs.

    Attributes:
        path: the tensor path.
        status: ``equal`` (equal values; NaN equals NaN), ``different``, ``only_a``, ``only_b`` or
            ``shape`` (shapes differ; not compared).
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


def _stream(reader: ShardReader, index: Index, e: TensorEntry) -> Any:
    if e.layout == "per_rank":  # compare rank 0's copy (RNG states differ per rank anyway)
        yield 0, reader.read_rank(e, 0).reshape(-1)
        return
    yield from reader.iter_range(e, 0, e.numel, BLOCK_ELEMS)


def _compare(
    ra: ShardReader, ia: Index, ea: TensorEntry, rb: ShardReader, ib: Index, eb: TensorEntry
) -> tuple[float, float]:
    max_abs = max_rel = 0.0
    it_b = _stream(rb, ib, eb)
    pending = torch.empty(0, dtype=torch.float64)
    for _, xa in _stream(ra, ia, ea):
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


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    tag_a: str | None = None,
    tag_b: str | None = None,
) -> list[TensorDiff]:
    """Compare every tensor of checkpoints ``a`` and ``b`` (roots or tag directories).

    Returns one :class:`TensorDiff` per path in either checkpoint, ``a``'s order first.
    """
    da, db = resolve(a, tag_a), resolve(b, tag_b)
    ia, ib = read_index(da), read_index(db)
    out: list[TensorDiff] = []
    with ShardReader(da, ia) as ra, ShardReader(db, ib) as rb:
        for path in list(ia.tensors) + [p for p in ib.tensors if p not in ia.tensors]:
            ea, eb = ia.tensors.get(path), ib.tensors.get(path)
            if ea is None or eb is None:
                status = "only_a" if eb is None else "only_b"
                out.append(
                    TensorDiff(
                        path,
                        status,
                        shape_a=ea.shape if ea else None,
                        shape_b=eb.shape if eb else None,
                        dtype_a=ea.dtype if ea else None,
                        dtype_b=eb.dtype if eb else None,
                    )
                )
                continue
            common: dict[str, Any] = {
                "shape_a": ea.shape,
                "shape_b": eb.shape,
                "dtype_a": ea.dtype,
                "dtype_b": eb.dtype,
            }
            if ea.shape != eb.shape:
                out.append(TensorDiff(path, "shape", **common))
                continue
            max_abs, max_rel = _compare(ra, ia, ea, rb, ib, eb)
            status = "equal" if max_abs == 0.0 else "different"
            out.append(TensorDiff(path, status, max_abs, max_rel, **common))
    return out
