"""``consolidate``: the model weights as a Hugging Face-style ``model.safetensors``.

Keys are module FQNs, so ``model.load_state_dict(load_file(path), strict=True)`` works:

* trainable parameters come from the fp32 master weights (exact), frozen ones from ``params``;
  floating-point parameters are cast to ``dtype``; buffers keep their dtype;
* tied weights (recorded at save time) are written under every alias, each its own copy:
  safetensors refuses shared tensors and ``load_state_dict(strict=True)`` needs every key;
  the header's ``__metadata__["funczero_tied"]`` lists the ties (JSON);
* non-persistent buffers (recorded when ``save`` was given ``module=``) are left out, as in
  ``state_dict()``.

Values stream from the shards to the output in blocks of :data:`BLOCK_ELEMS`, so memory stays
near one block whatever the model or tensor size. With ``max_shard_size`` the output is split
into ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from safetensors.torch import load_file
    >>> from funczero.checkpoint import save
    >>> from funczero.testing.states import toy_state
    >>> src = save(tempfile.mkdtemp(), toy_state(), aliases={"head.weight": "emb"})
    >>> out = Path(tempfile.mkdtemp()) / "hf"
    >>> files = consolidate(src, out)
    >>> sorted(load_file(out / "model.safetensors"))[:3]
    ['b', 'emb', 'frozen']
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import torch

from funczero.checkpoint.atomic import fsync_dir
from funczero.checkpoint.entry import TensorEntry
from funczero.checkpoint.errors import CheckpointExistsError, CorruptCheckpointError
from funczero.checkpoint.index import Index, read_index
from funczero.checkpoint.reader import BLOCK_ELEMS, ShardReader
from funczero.checkpoint.tags import resolve
from funczero.checkpoint.tensorfile import TensorFileWriter

__all__ = ["consolidate", "parse_size"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size`` (``5GB`` = 5e9 as in Hugging Face, ``512MiB`` = 512 * 2**20)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"size {size!r} is not a number with a unit such as 500MB, 5GB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


Output = tuple[str, TensorEntry, torch.dtype]
"""``(key, source tensor, dtype)`` of one tensor of the output."""


def consolidate(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the checkpoint's model weights to ``out`` as Hugging Face-style safetensors.

    Args:
        directory: checkpoint root or tag directory.
        out: output directory (created).
        tag: which checkpoint (default ``latest``).
        dtype: ``fp32``, ``bf16`` or ``fp16`` for floating-point parameters.
        max_shard_size: split into files of at most this size (``"5GB"``); a tensor larger
            than it gets a file of its own. ``None``: one ``model.safetensors``.
        overwrite: replace existing output files.

    Returns:
        The files written (weights, then the index if sharded).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(_DTYPES)}")
    tag_dir = resolve(directory, tag)
    index = read_index(tag_dir)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    groups = _split(_outputs(index, _DTYPES[dtype], str(tag_dir)), limit)
    n = len(groups)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = [out_dir / name for name in names] + (
        [out_dir / "model.safetensors.index.json"] if n > 1 else []
    )
    clash = [p.name for p in final if p.exists()]
    if clash and not overwrite:
        raise CheckpointExistsError(
            f"{out_dir} already holds {', '.join(clash)}; pass overwrite=True (--overwrite) "
            "or choose another directory"
        )
    written = _write_files(tag_dir, index, out_dir, list(zip(names, groups)))
    if n > 1:
        weight_map = {k: name for name, group in zip(names, groups) for k, _, _ in group}
        total = sum(e.numel * d.itemsize for group in groups for _, e, d in group)
        text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        (out_dir / "model.safetensors.index.json").write_text(text + "\n", encoding="utf-8")
        written.append(out_dir / "model.safetensors.index.json")
    fsync_dir(out_dir)
    return written


def _outputs(index: Index, target: torch.dtype, where: str) -> list[Output]:
    """Every tensor of the output: parameters (and their tied aliases), then buffers."""
    tensors = index.tensors
    outputs: list[Output] = []
    for name in index.param_shapes:
        source = tensors.get(f"master/{name}") or tensors.get(f"params/{name}")
        if source is None:
            raise CorruptCheckpointError(
                f"parameter {name} has neither master/ nor params/ tensor", where=where
            )
        out_dtype = target if source.dtype.is_floating_point else source.dtype
        tied = sorted(a for a, c in index.aliases.items() if c == name and a != name)
        outputs += [(key, source, out_dtype) for key in [name, *tied]]
    skip = set(index.non_persistent_buffers)
    for path, e in tensors.items():
        if e.kind == "buffer":
            key = path.split("/", 1)[1]  # the index's validation guarantees 'buffers/<fqn>'
            if key not in skip:
                outputs.append((key, e, e.dtype))
    seen: set[str] = set()
    for key, _, _ in outputs:
        if key in seen:
            raise CorruptCheckpointError(
                f"{key!r} is both a parameter (or tied alias) and a buffer, or tied twice: "
                "a state dict cannot hold it twice",
                where=where,
            )
        seen.add(key)
    return outputs


def _split(outputs: list[Output], limit: int | None) -> list[list[Output]]:
    """Files of at most ``limit`` bytes (one, without a limit), in order."""
    groups: list[list[Output]] = [[]]
    size = 0
    for item in outputs:
        nbytes = item[1].numel * item[2].itemsize
        if limit is not None and groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    return groups


def _write_files(
    tag_dir: Path, index: Index, out_dir: Path, files: list[tuple[str, list[Output]]]
) -> list[Path]:
    """Stream every file to a hidden temporary name, then publish them all (renames)."""
    meta = {
        "format": "pt",
        "funczero_source": f"{index.tag} (step {index.step})",
        "funczero_tied": json.dumps(dict(index.aliases), sort_keys=True),
    }
    nonce = uuid.uuid4().hex[:12]
    temps: list[Path] = []
    written: list[Path] = []
    try:
        with ShardReader(tag_dir, index) as reader:
            for name, group in files:
                tmp = out_dir / f".{name}.tmp-{nonce}"
                temps.append(tmp)
                writer = TensorFileWriter(tmp, [(k, d, e.shape) for k, e, d in group], meta)
                try:
                    for _, e, d in group:
                        for _, piece in reader.iter_range(e, 0, e.numel, BLOCK_ELEMS):
                            writer.append(piece.to(d))
                    writer.finish()
                except BaseException:
                    writer.abort()
                    raise
        # Publish only once every file is complete and checked (renames are atomic).
        for tmp, (name, _) in zip(temps, files):
            os.replace(tmp, out_dir / name)
            written.append(out_dir / name)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return written
