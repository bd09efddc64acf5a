"""Where pretrained weights come from: Hugging Face safetensors files or a funczero checkpoint.

:func:`open_weights` recognises, from a path:

* a Hugging Face model directory or file: ``model.safetensors``, or a sharded
  ``model.safetensors.index.json`` with its ``model-0000k-of-0000n.safetensors`` files (funczero's
  ``consolidate`` writes the same layout);
* a funczero training checkpoint (a root with ``latest``, or a tag directory with
  ``index.json``): its weights only (fp32 master copies of trained parameters, ``params/`` of
  frozen ones, buffers); the optimizer files are never opened.

Either way the result is a :class:`WeightSource`: tensor names with global shapes and dtypes,
and :meth:`WeightSource.read_into` / :meth:`WeightSource.iter_range`, which read a flat element
range of one tensor and nothing else of its file (the exact byte range: a row-major tensor's
flat elements ``[a, b)`` are bytes ``[begin + a * itemsize, begin + b * itemsize)``). Nothing here unpickles: a
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

import concurrent.futures
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

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
state, whatever the tensor size."""

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

    def iter_range(
        self, name: str, a: int, b: int, buffer: torch.Tensor | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, values)``: 1-D CPU blocks of elements ``[a, b)`` of ``name``, in order.

        With ``buffer`` (1-D, the tensor's dtype, at least :data:`BLOCK_ELEMS` elements) the
        blocks are views into it, valid until the next block is read.
        """
        raise NotImplementedError

    def read_into(self, name: str, a: int, b: int, dst: torch.Tensor) -> None:
        """Fill the contiguous 1-D CPU tensor ``dst`` with elements ``[a, b)`` (cast to its dtype)."""
        for start, block in self.iter_range(name, a, b):
            dst[start - a : start - a + block.numel()].copy_(block)

    def close(self) -> None:
        """Release open files (and finish pending checks, which may raise)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Entry(NamedTuple):
    file: Path
    begin: int  # byte offset of the tensor's data in its file
    info: SourceTensor


class SafetensorsWeights(WeightSource):
    """Tensors of one or more safetensors files (a Hugging Face model directory).

    ``safe_open`` validates each file (header, offsets, size) and gives names, shapes and
    dtypes; values are then read with ``preadv`` of exactly the requested byte range, straight
    into the destination when it has the stored dtype. No file is memory-mapped while reading,
    so a rank's resident memory grows by what it keeps, not by the file pages it touched.

    Args:
        path: the file or directory the user named.
        files: the files to read.
        weight_map: tensor name -> file, from a sharded index (then only these tensors are
            offered, each checked to be in its file); default: every tensor of ``files``.
    """

    kind = "safetensors"

    def __init__(
        self, path: Path, files: Sequence[Path], weight_map: Mapping[str, Path] | None = None
    ) -> None:
        self.path = path
        self._fds: dict[Path, int] = {}
        entries: dict[str, _Entry] = {}
        tied: dict[str, str] = {}
        for file in files:
            described, meta = _read_header(file)
            tied.update(_recorded_ties(meta))
            if weight_map is None:
                entries.update(described)
                continue
            for name in [n for n, f in weight_map.items() if f == file]:
                if name not in described:
                    raise WeightsFormatError(
                        f"{file.name} has no tensor {name!r}, which the index {path} places "
                        "there; the index belongs to other files"
                    )
                entries[name] = described[name]
        self._entries = entries
        self.tensors = {n: e.info for n, e in entries.items()}
        self.tied = {a: c for a, c in tied.items() if c in self.tensors and a not in self.tensors}

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def _pread(self, name: str, a: int, dst: torch.Tensor) -> None:
        e = self._entries[name]
        view = _byte_view(dst)
        offset = e.begin + a * e.info.dtype.itemsize
        fd = self._fd(e.file)
        while len(view):
            got = os.preadv(fd, [view], offset)
            if got <= 0:
                raise WeightsFormatError(
                    f"{e.file} ended at byte {offset} while reading {name!r}: the file was "
                    "truncated or replaced while loading"
                )
            offset += got
            view = view[got:]

    def _check(self, name: str, a: int, b: int) -> None:
        numel = self.tensors[name].numel
        if not 0 <= a <= b <= numel:
            raise ValueError(f"{name}: range [{a}, {b}) outside its {numel} elements")

    def iter_range(
        self, name: str, a: int, b: int, buffer: torch.Tensor | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """See :meth:`WeightSource.iter_range`; with a ``buffer`` of two blocks, the next block
        is read on a helper thread while the caller uses the current one."""
        self._check(name, a, b)
        dtype = self.tensors[name].dtype
        starts = range(a, b, BLOCK_ELEMS)
        if buffer is None or buffer.numel() < 2 * BLOCK_ELEMS or len(starts) < 2:
            for s in starts:
                n = min(BLOCK_ELEMS, b - s)
                block = buffer[:n] if buffer is not None else torch.empty(n, dtype=dtype)
                self._pread(name, s, block)
                yield s, block
            return
        halves = buffer[: 2 * BLOCK_ELEMS].view(2, BLOCK_ELEMS)

        def read(i: int) -> torch.Tensor:
            s = starts[i]
            block = halves[i % 2][: min(BLOCK_ELEMS, b - s)]
            self._pread(name, s, block)
            return block

        pending = _reader_thread().submit(read, 0)
        for i, s in enumerate(starts):
            block = pending.result()
            if i + 1 < len(starts):
                # The caller is done with the other half once it asks for this block.
                pending = _reader_thread().submit(read, i + 1)
            yield s, block

    def read_into(self, name: str, a: int, b: int, dst: torch.Tensor) -> None:
        self._check(name, a, b)
        if dst.dtype == self.tensors[name].dtype and dst.is_contiguous() and dst.device.type == "cpu":
            self._pread(name, a, dst)  # no copy: the bytes land where they belong
        else:
            super().read_into(name, a, b, dst)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


_READER: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


def _reader_thread() -> concurrent.futures.ThreadPoolExecutor:
    """This process's read-ahead thread (a forked child makes its own: threads do not fork)."""
    global _READER
    if _READER is None or _READER[0] != os.getpid():
        _READER = (os.getpid(), concurrent.futures.ThreadPoolExecutor(1, "funczero-read-ahead"))
    return _READER[1]


def _read_header(file: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Validate ``file`` with ``safe_open``; return its tensors' byte offsets and its metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            infos = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                view = f.get_slice(name)
                code = view.get_dtype()
                if code not in _ST_DTYPES:
                    raise WeightsFormatError(
                        f"{file.name}: tensor {name!r} has dtype {code}, which funczero cannot "
                        f"load (supported: {', '.join(_ST_DTYPES)}); convert it to bf16 or fp32"
                    )
                infos[name] = SourceTensor(tuple(int(d) for d in view.get_shape()), _ST_DTYPES[code])
    except SafetensorError as e:
        raise WeightsFormatError(
            f"{file} is not a readable safetensors file ({e}); it is truncated or damaged: "
            "download or export it again"
        ) from e
    # safe_open checked the header (offsets in bounds, sizes matching shapes and dtypes);
    # read the offsets it does not expose from the same bytes.
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    entries = {}
    for name, info in infos.items():
        begin, end = (int(x) for x in header[name]["data_offsets"])
        if end - begin != info.numel * info.dtype.itemsize:
            raise WeightsFormatError(f"{file.name}: tensor {name!r} has a byte range of the wrong size")
        entries[name] = _Entry(file, 8 + n + begin, info)
    return entries, meta


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray())
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


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

    def iter_range(
        self, name: str, a: int, b: int, buffer: torch.Tensor | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        yield from self._reader.iter_range(self._entries[name], a, b, BLOCK_ELEMS)

    def read_into(self, name: str, a: int, b: int, dst: torch.Tensor) -> None:
        if dst.is_contiguous() and dst.device.type == "cpu":
            self._reader.read_range(self._entries[name], a, b, dst)  # checks whole chunks' SHA-256
        else:
            super().read_into(name, a, b, dst)

    def close(self) -> None:
        self._reader.close()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self._reader.finish()  # raises if a chunk read whole failed its checksum
        finally:
            self.close()


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
    return SafetensorsWeights(file, [file])


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
    return SafetensorsWeights(index_file, list(dict.fromkeys(files.values())), files)


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
