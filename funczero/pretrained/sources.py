"""Where pretrained weights come from: Hugging Face safetensors files or a funczero checkpoint.

:func:`open_weights` recognises, from a path:

* a Hugging Face model directory or file: ``model.safetensors``, or a sharded
  ``model.safetensors.index.json`` with its ``model-0000k-of-0000n.safetensors`` files (funczero's
  ``consolidate`` writes the same layout);
* a funczero training checkpoint (a root with ``latest``, or a tag directory with
  ``index.json``): its weights only (fp32 master copies of trained parameters, ``params/`` of
  frozen ones, buffers); the optimizer files are never opened.

Either way the result is a :class:`WeightSource`: tensor names with global shapes and dtypes,
and :meth:`WeightSource.iter_range`, which reads a flat element range of one tensor without
reading the rest of its file (``safe_open(...).get_slice`` of the covering rows for safetensors,
byte ranges of the shard files for funczero checkpoints). Nothing here unpickles: a
``pytorch_model.bin`` is refused with the command that converts it.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> d = Path(tempfile.mkdtemp())
    >>> save_file({"w": torch.arange(6.0).view(3, 2)}, d / "model.safetensors")
    >>> with open_weights(d) as src:
    ...     src.tensors["w"], [b for _, b in src.iter_range("w", 1, 4)]
    (SourceTensor(shape=(3, 2), dtype=torch.float32), [tensor([1., 2., 3.])])
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from funczero.pretrained.errors import WeightsFormatError

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "BLOCK_ELEMS",
    "CheckpointWeights",
    "SafetensorsWeights",
    "SourceTensor",
    "WeightSource",
    "open_weights",
]

BLOCK_ELEMS = 1 << 24
"""Elements read per block (64 MiB of fp32): bounds the host memory a load needs on top of the
state, whatever the tensor size (a single row larger than this is read whole)."""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_INDEX_BYTES = 64 << 20
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class SourceTensor(NamedTuple):
    """One tensor of a weight source: its global shape and stored dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class WeightSource:
    """Named tensors that can be read by flat element ranges (a context manager).

    Attributes:
        path: what was opened (a file or directory), for messages.
        kind: ``"safetensors"`` or ``"funczero checkpoint"``.
        tensors: every tensor by name.
        tied: ties the source records (alias name -> canonical name); values are stored once.
    """

    path: Path
    kind: str
    tensors: Mapping[str, SourceTensor]
    tied: Mapping[str, str]

    def iter_range(self, name: str, a: int, b: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, values)``: 1-D CPU blocks of elements ``[a, b)`` of ``name``, in order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (and finish pending checks, which may raise)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsWeights(WeightSource):
    """Tensors of one or more safetensors files (a Hugging Face model directory).

    Args:
        files: tensor name -> the file holding it.
        path: the file or directory the user named.
    """

    kind = "safetensors"

    def __init__(self, files: Mapping[str, Path], path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = path
        self._where = dict(files)
        self._open: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()
        tensors: dict[str, SourceTensor] = {}
        tied: dict[str, str] = {}
        try:
            for file in dict.fromkeys(self._where.values()):
                try:
                    handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
                    stored = set(handle.keys())
                    meta = handle.metadata() or {}
                except SafetensorError as e:
                    raise WeightsFormatError(
                        f"{file} is not a readable safetensors file ({e}); it is truncated or "
                        "damaged: download or export it again"
                    ) from e
                self._open[file] = handle
                tied.update(_recorded_ties(meta))
                for name in [n for n, f in self._where.items() if f == file]:
                    if name not in stored:
                        raise WeightsFormatError(
                            f"{file.name} has no tensor {name!r}, which the index "
                            f"{path} places there; the index belongs to other files"
                        )
                    tensors[name] = self._describe(handle, name, file)
        except BaseException:
            self._stack.close()
            raise
        self.tensors = tensors
        self.tied = {a: c for a, c in tied.items() if c in tensors and a not in tensors}

    @staticmethod
    def _describe(handle: Any, name: str, file: Path) -> SourceTensor:
        view = handle.get_slice(name)
        code = view.get_dtype()
        if code not in _ST_DTYPES:
            raise WeightsFormatError(
                f"{file.name}: tensor {name!r} has dtype {code}, which funczero cannot load "
                f"(supported: {', '.join(_ST_DTYPES)}); convert the checkpoint to bf16 or fp32"
            )
        return SourceTensor(tuple(int(d) for d in view.get_shape()), _ST_DTYPES[code])

    def iter_range(self, name: str, a: int, b: int) -> Iterator[tuple[int, torch.Tensor]]:
        info = self.tensors[name]
        if not 0 <= a <= b <= info.numel:
            raise ValueError(f"{name}: range [{a}, {b}) outside its {info.numel} elements")
        if a == b:
            return
        handle = self._open[self._where[name]]
        if len(info.shape) == 0:
            yield 0, handle.get_tensor(name).reshape(1)
            return
        view = handle.get_slice(name)
        # Rows are the unit safetensors slices by; read the rows covering [a, b) in blocks and
        # cut the exact elements out of the first and last block.
        row = math.prod(info.shape[1:])
        rows_per_block = max(1, BLOCK_ELEMS // max(row, 1))
        first, last = a // row, -(-b // row)
        for r in range(first, last, rows_per_block):
            stop = min(r + rows_per_block, last)
            block = view[r:stop].reshape(-1)
            lo, hi = max(a, r * row), min(b, stop * row)
            yield lo, block[lo - r * row : hi - r * row]

    def close(self) -> None:
        self._open.clear()
        self._stack.close()


def _recorded_ties(meta: Mapping[str, str]) -> dict[str, str]:
    """Ties recorded by funczero's ``consolidate`` (``__metadata__["funczero_tied"]``)."""
    try:
        ties = json.loads(meta.get("funczero_tied", "{}"))
    except ValueError:
        return {}
    if not isinstance(ties, dict):
        return {}
    return {a: c for a, c in ties.items() if isinstance(a, str) and isinstance(c, str) and a != c}


class CheckpointWeights(WeightSource):
    """The weights of a funczero training checkpoint (fp32 master copies where trained).

    Args:
        tag_dir: the checkpoint's tag directory.
    """

    kind = "funczero checkpoint"

    def __init__(self, tag_dir: Path) -> None:
        from funczero.checkpoint.index import read_index
        from funczero.checkpoint.reader import ShardReader

        self.path = tag_dir
        index = read_index(tag_dir)
        self._entries = {}
        for name in index.param_shapes:
            entry = index.tensors.get(f"master/{name}") or index.tensors.get(f"params/{name}")
            if entry is not None:
                self._entries[name] = entry
        for path, entry in index.tensors.items():
            if entry.kind == "buffer":
                self._entries[path.split("/", 1)[1]] = entry
        self.tensors = {
            name: SourceTensor(tuple(e.shape), index.resolve(e).dtype)
            for name, e in self._entries.items()
        }
        self.tied = {a: c for a, c in index.aliases.items() if a != c and a not in self.tensors}
        self._reader = ShardReader(tag_dir, index)

    def iter_range(self, name: str, a: int, b: int) -> Iterator[tuple[int, torch.Tensor]]:
        yield from self._reader.iter_range(self._entries[name], a, b, BLOCK_ELEMS)

    def close(self) -> None:
        # finish() raises if a chunk read whole failed its checksum.
        try:
            self._reader.finish()
        finally:
            self._reader.close()


def open_weights(path: str | os.PathLike[str]) -> WeightSource:
    """Open the weights at ``path`` (see the module docstring for what is recognised).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        WeightsFormatError: ``path`` is neither format, or its files are damaged; the message
            says what was found and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pretrained weights at {path}: the path does not exist")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _sharded(path)
        if path.suffix == ".safetensors":
            return _single(path)
        if path.name == "index.json" or path.name == "latest":
            return _checkpoint(path.parent)
        raise _unknown(path, [path.name])
    if (path / INDEX_FILE).is_file():
        return _sharded(path / INDEX_FILE)
    if (path / SINGLE_FILE).is_file():
        return _single(path / SINGLE_FILE)
    if (path / "index.json").is_file() or (path / "latest").is_file():
        return _checkpoint(path)
    names = sorted(p.name for p in path.iterdir())
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) == 1:
        return _sharded(path / indexes[0])
    if not indexes and len(files) == 1:
        return _single(path / files[0])
    raise _unknown(path, names)


def _single(file: Path) -> SafetensorsWeights:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
    except SafetensorError as e:
        raise WeightsFormatError(
            f"{file} is not a readable safetensors file ({e}); it is truncated or damaged: "
            "download or export it again"
        ) from e
    return SafetensorsWeights({n: file for n in names}, file)


def _sharded(index_file: Path) -> SafetensorsWeights:
    """A Hugging Face sharded index: ``{"weight_map": {tensor: file name}}``."""
    if index_file.stat().st_size > _MAX_INDEX_BYTES:
        raise WeightsFormatError(f"{index_file} is larger than {_MAX_INDEX_BYTES} bytes: not an index")
    try:
        raw = json.loads(index_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsFormatError(f"{index_file} is not valid JSON ({e})") from e
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise WeightsFormatError(
            f"{index_file} has no weight_map of tensor names to file names; it is not a "
            "Hugging Face safetensors index"
        )
    base = index_file.parent
    files: dict[str, Path] = {}
    bad: list[str] = []
    for name, file in weight_map.items():
        # File names come from an untrusted JSON: only plain names inside the directory.
        if not file or file in (".", "..") or "/" in file or "\\" in file or "\0" in file:
            bad.append(f"{name!r} -> {file!r} is not a plain file name")
        elif not (base / file).is_file():
            bad.append(f"{name!r} -> {file} does not exist in {base}")
        else:
            files[name] = base / file
    if bad:
        shown = "\n".join(f"  - {b}" for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise WeightsFormatError(
            f"{index_file} names files that cannot be read ({len(bad)}):\n{shown}{more}\n"
            "Download the missing shard files next to the index."
        )
    return SafetensorsWeights(files, index_file)


def _checkpoint(directory: Path) -> CheckpointWeights:
    from funczero.checkpoint.tags import resolve

    return CheckpointWeights(resolve(directory))


def _unknown(path: Path, names: list[str]) -> WeightsFormatError:
    shown = ", ".join(names[:12]) + (f" ... ({len(names)} entries)" if len(names) > 12 else "")
    if any(n in _PICKLES or n.endswith((".bin", ".pt", ".pth")) for n in names):
        return WeightsFormatError(
            f"{path} holds pickled PyTorch weights ({shown}); funczero never unpickles (loading "
            "a pickle can run code). Convert them once, in a process you trust: "
            "`python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\"`"
        )
    return WeightsFormatError(
        f"{path} is neither a Hugging Face safetensors model ({SINGLE_FILE} or {INDEX_FILE}) "
        f"nor a funczero checkpoint (index.json or latest); it holds: {shown or 'nothing'}"
    )
