"""``inspect``: what a checkpoint holds, from its index alone (no tensor bytes are read).

Example:
    >>> import tempfile
    >>> from funczero.checkpoint import save
    >>> from funczero.testing.states import toy_state
    >>> s = inspect(save(tempfile.mkdtemp(), toy_state()))
    >>> s.step, s.world_size, s.param_count
    (3, 1, 41)
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from funczero.checkpoint.index import read_index
from funczero.checkpoint.tags import resolve

__all__ = ["GROUP_OF_KIND", "Summary", "inspect"]

GROUP_OF_KIND = {
    "param": "params",
    "master": "master",
    "moment": "moments",
    "optim": "optimizer (other)",
    "buffer": "buffers",
    "scalar": "other",
    "rng": "other",
}
"""How tensor kinds are grouped in the byte counts."""


@dataclasses.dataclass(frozen=True)
class Summary:
    """A checkpoint at a glance (see :func:`inspect`)."""

    tag_dir: Path
    tag: str
    step: int
    world_size: int
    stage: int
    precision: str
    optimizer: str
    param_count: int
    trainable_count: int
    sharded_params: int
    bytes_by_group: dict[str, int]
    files: list[dict[str, Any]]
    tensors: list[dict[str, Any]]
    versions: dict[str, str]
    created: str
    client_state_keys: list[str]

    def to_json(self, *, tensors: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tag_dir"] = str(self.tag_dir)
        if not tensors:
            out.pop("tensors")
        return out


def _text(value: Any, limit: int = 200) -> str:
    """A free-form index value as text, cut short (the index may come from anywhere)."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def inspect(directory: str | os.PathLike[str], tag: str | None = None) -> Summary:
    """Summarise the checkpoint at ``directory`` (a root or a tag directory) and ``tag``.

    Byte counts are of what is stored: a tensor aliased to another (``params/w`` that is the
    stage-3 master shard) counts once, under the group of the stored copy.
    """
    tag_dir = resolve(directory, tag)
    index = read_index(tag_dir)
    shapes = index.param_shapes
    trainable = index.trainable
    groups: dict[str, int] = {g: 0 for g in dict.fromkeys(GROUP_OF_KIND.values())}
    tensors = []
    for e in index.tensors.values():
        stored = sum(c.numel for c in e.chunks) * e.dtype.itemsize
        groups[GROUP_OF_KIND[e.kind]] += stored
        tensors.append(
            {
                "path": e.path,
                "shape": list(e.shape),
                "dtype": e.dtype_name,
                "layout": e.placement,
                "alias_of": e.alias_of,
                "bytes": stored,
                "chunks": [
                    {"rank": index.files[c.file].rank, "start": c.start, "stop": c.stop}
                    for c in e.chunks
                ],
            }
        )
    files = [
        {"name": f.name, "group": f.group, "rank": f.rank, "bytes": f.bytes, "sha256": f.sha256}
        for f in index.files.values()
    ]
    client = index.client_state
    raw = index.raw
    return Summary(
        tag_dir=tag_dir,
        tag=index.tag,
        step=index.step,
        world_size=index.world_size,
        stage=index.stage,
        precision=index.precision,
        optimizer=_text(raw.get("optimizer", "")),
        param_count=sum(math.prod(s) for s in shapes.values()),
        trainable_count=sum(math.prod(shapes[n]) for n in trainable),
        sharded_params=sum(
            1 for e in index.tensors.values() if e.path.startswith("params/") and e.placement == "shard"
        ),
        bytes_by_group=groups,
        files=files,
        tensors=tensors,
        versions={
            "format": str(index.format_version),
            "funczero": _text(raw.get("funczero_version")),
            "torch": _text(raw.get("torch_version")),
        },
        created=_text(raw.get("created", "")),
        client_state_keys=sorted(client) if isinstance(client, dict) else [],
    )
