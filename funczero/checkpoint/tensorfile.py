"""Streaming reader and writer of safetensors files, with checksums.

The files are standard safetensors (readable by ``safetensors.safe_open``/``load_file``): an
8-byte little-endian header length ``N``, ``N`` bytes of JSON header (padded with spaces to a
multiple of 8), then the tensors' bytes back to back. Writing and reading here stream: a
tensor can be appended in pieces and a byte range read straight into a destination tensor, so
memory stays bounded by the pieces, never the file.

Checksums: every entry's bytes get a SHA-256 (``entry digest``); a file's checksum is
``sha256(header bytes || entry digest 1 || ... || entry digest k)`` over the entries in file
order, which fixes every byte of the file (see ``docs/checkpoint-format.md``).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "a.safetensors"
    >>> w = TensorFileWriter(path, [("x", torch.float32, (3,))])
    >>> w.append(torch.arange(3.0)); rec = w.finish()
    >>> TensorFile(path).read("x", 1, 3)
    tensor([1., 2.])
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from funczero.checkpoint.errors import CorruptCheckpointError
from funczero.checkpoint.format import MAX_DIM, MAX_NDIM
from funczero.checkpoint.safe_io import loads_json, open_regular

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; only for annotations

__all__ = ["MAX_HEADER", "FileRecord", "TensorFile", "TensorFileWriter", "file_digest", "st_dtype"]

_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_FROM_ST = {v: k for k, v in _ST.items()}
MAX_HEADER = 100_000_000
"""safetensors' own header limit; readers that know what a file holds pass a tighter one."""
_BLOCK = 16 << 20


_POOL: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


def _hasher() -> concurrent.futures.ThreadPoolExecutor:
    """The hashing thread of this process (a forked child gets its own: threads do not fork)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), concurrent.futures.ThreadPoolExecutor(1, "funczero-sha256"))
    return _POOL[1]


def st_dtype(dtype: torch.dtype) -> str:
    """safetensors' name of ``dtype`` (``torch.float32`` -> ``"F32"``)."""
    return _ST[dtype]


def file_digest(header: bytes, entry_digests: Sequence[str]) -> str:
    """The file checksum: SHA-256 of the header bytes followed by the entry digests (hex)."""
    h = hashlib.sha256(header)
    for d in entry_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """What a finished file looks like: its size, its checksum, each entry's digest."""

    path: Path
    bytes: int
    sha256: str
    digests: Mapping[str, str]


class TensorFileWriter:
    """Write a safetensors file whose entries are known up front, streaming their bytes.

    Args:
        path: file to create (must not exist).
        entries: ``(key, dtype, shape)`` in the order their bytes will be appended.
        metadata: string map stored in the header's ``__metadata__``.
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self._sizes: list[tuple[str, int, torch.dtype]] = []
        offset = 0
        for key, dtype, shape in entries:
            if key in header or key == "__metadata__":
                raise ValueError(f"duplicate tensor key {key!r} in {path}")
            size = math.prod(shape) * dtype.itemsize
            header[key] = {
                "dtype": st_dtype(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._sizes.append((key, size, dtype))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # 8-byte alignment of the data, as safetensors pads
        self.header = len(text).to_bytes(8, "little") + text
        self.path = path
        self._total = len(self.header) + offset
        self._file = open(path, "xb", buffering=0)  # noqa: SIM115 - closed in finish/abort
        self._index = 0
        self._filled = 0
        self._digests: dict[str, str] = {}
        self._hash = hashlib.sha256()
        self._write(memoryview(self.header))
        self._skip_empty()

    def _write(self, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" else data
        while len(view):
            n = self._file.write(view)
            view = view[n:]

    def _skip_empty(self) -> None:
        while self._index < len(self._sizes) and self._sizes[self._index][1] == self._filled:
            self._digests[self._sizes[self._index][0]] = self._hash.hexdigest()
            self._index += 1
            self._filled = 0
            self._hash = hashlib.sha256()

    def append(self, part: torch.Tensor) -> None:
        """Append ``part``'s bytes to the current entry (advancing when it is complete)."""
        if self._index >= len(self._sizes):
            raise ValueError(f"{self.path}: every entry is already complete")
        key, size, dtype = self._sizes[self._index]
        if part.dtype != dtype:
            raise TypeError(f"{self.path}: entry {key!r} is {dtype}, got a {part.dtype} part")
        part = part.detach()
        if part.device.type != "cpu":
            part = part.cpu()
        data = _as_bytes(part.contiguous())
        if self._filled + len(data) > size:
            raise ValueError(f"{self.path}: entry {key!r} overflows its {size} bytes")
        # Hash block i on a helper thread while block i is written: both release the GIL,
        # so checksums cost (almost) no wall time on top of the write.
        pending = None
        for lo in range(0, len(data), _BLOCK):
            block = data[lo : lo + _BLOCK]
            if pending is not None:
                pending.result()
            pending = _hasher().submit(self._hash.update, block)
            self._write(block)
        if pending is not None:
            pending.result()
        self._filled += len(data)
        self._skip_empty()

    def finish(self, *, fsync: bool = True) -> FileRecord:
        """Check every entry is complete, fsync and close; return the file's record."""
        try:
            if self._index != len(self._sizes):
                raise ValueError(
                    f"{self.path}: entry {self._sizes[self._index][0]!r} is incomplete"
                )
            if fsync:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        digests = [self._digests[k] for k, _, _ in self._sizes]
        return FileRecord(self.path, self._total, file_digest(self.header, digests), self._digests)

    def abort(self) -> None:
        """Close and delete the partial file."""
        self._file.close()
        self.path.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class _Info:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class TensorFile:
    """Read a safetensors file lazily: the header is parsed and validated, bytes read on demand.

    Only regular files are opened, and a header longer than ``max_header`` bytes is refused
    before it is read. Raises :class:`CorruptCheckpointError` for those, for truncated files
    and for malformed headers (strict JSON: no duplicate keys, ``NaN`` or ``Infinity``; sizes
    and offsets are non-negative integers).
    """

    def __init__(self, path: Path, *, max_header: int = MAX_HEADER) -> None:
        self.path = path
        fd = open_regular(path, "shard file")
        self._file = os.fdopen(fd, "rb", buffering=0)
        try:
            self._parse(min(max_header, MAX_HEADER))
        except BaseException:
            self._file.close()
            raise

    def _bad(self, msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"file {self.path.name}: {msg}", where=str(self.path.parent))

    def _parse(self, max_header: int) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._read_exact(0, 8) if size >= 8 else b""
        if len(head) < 8:
            raise self._bad(f"truncated: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise self._bad(f"truncated or not safetensors: header of {n} bytes, file of {size}")
        if n > max_header:
            raise self._bad(
                f"header of {n:,} bytes, more than the {max_header:,} bytes the tensors the index "
                "lists in this file can need; the file is damaged or not this checkpoint's"
            )
        self.header = head + self._read_exact(8, n)
        try:
            raw = loads_json(self.header[8:], max_depth=None)  # validated entry by entry
        except ValueError as e:
            raise self._bad(f"header is not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise self._bad("header is not a JSON object")
        meta = raw.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._bad("__metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        infos = {key: self._entry(key, v) for key, v in raw.items()}
        pos = 0
        for key, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if info.begin != pos:
                raise self._bad(f"entry {key!r} starts at byte {info.begin}, expected {pos}")
            pos = info.end
        self.data_start = 8 + n
        if self.data_start + pos != size:
            raise self._bad(
                f"truncated or padded: header describes {self.data_start + pos} bytes, "
                f"file has {size}"
            )
        self.entries = infos
        self.size = size

    def _entry(self, key: str, v: Any) -> _Info:
        def size(x: Any) -> bool:
            return type(x) is int and 0 <= x <= MAX_DIM

        ok = (
            isinstance(v, dict)
            and isinstance(v.get("dtype"), str)
            and v["dtype"] in _FROM_ST
            and isinstance(v.get("shape"), list)
            and len(v["shape"]) <= MAX_NDIM
            and all(size(d) for d in v["shape"])
            and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2
            and all(size(x) for x in v["data_offsets"])
        )
        if not ok:
            raise self._bad(
                f"entry {key!r} is malformed: it needs a known dtype, a shape and two data "
                "offsets of non-negative integers"
            )
        dtype = _FROM_ST[v["dtype"]]
        shape = tuple(v["shape"])
        begin, end = v["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise self._bad(f"entry {key!r}: byte range does not match shape and dtype")
        return _Info(dtype, shape, begin, end)

    def _read_exact(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self._readinto_at(offset, memoryview(buf))
        return bytes(buf)

    def _readinto_at(self, offset: int, view: memoryview) -> None:
        view = view.cast("B") if view.format != "B" else view
        while len(view):
            got = os.preadv(self._file.fileno(), [view], offset)
            if got <= 0:
                raise self._bad(f"unexpected end of file at byte {offset}")
            offset += got
            view = view[got:]

    def info(self, key: str) -> _Info:
        try:
            return self.entries[key]
        except KeyError:
            raise self._bad(f"has no tensor {key!r}") from None

    def read_into(self, key: str, dst: torch.Tensor, lo: int, hi: int) -> None:
        """Read flat elements ``[lo, hi)`` of ``key`` into the contiguous CPU tensor ``dst``."""
        info = self.info(key)
        numel = math.prod(info.shape)
        if not 0 <= lo <= hi <= numel or dst.numel() != hi - lo or dst.dtype != info.dtype:
            raise ValueError(f"{self.path.name}: bad read of {key!r}[{lo}:{hi}] into {dst.dtype}")
        if hi > lo:
            item = info.dtype.itemsize
            self._readinto_at(self.data_start + info.begin + lo * item, _as_bytes(dst))

    def read(self, key: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Return flat elements ``[lo, hi)`` of ``key`` as a new 1-D CPU tensor."""
        info = self.info(key)
        hi = math.prod(info.shape) if hi is None else hi
        out = torch.empty(max(hi - lo, 0), dtype=info.dtype)
        self.read_into(key, out, lo, hi)
        return out

    def iter_blocks(self, key: str, block_bytes: int = _BLOCK) -> Iterator[torch.Tensor]:
        """Yield ``key``'s flat values in pieces of about ``block_bytes``."""
        info = self.info(key)
        numel = math.prod(info.shape)
        step = max(1, block_bytes // max(info.dtype.itemsize, 1))
        for lo in range(0, numel, step):
            yield self.read(key, lo, min(numel, lo + step))

    def entry_digest(self, key: str, block_bytes: int = _BLOCK) -> str:
        """SHA-256 of ``key``'s bytes, streamed."""
        info = self.info(key)
        h = hashlib.sha256()
        buf = bytearray(min(block_bytes, info.end - info.begin))
        pos = info.begin
        while pos < info.end:
            n = min(len(buf), info.end - pos)
            view = memoryview(buf)[:n]
            self._readinto_at(self.data_start + pos, view)
            h.update(view)
            pos += n
        return h.hexdigest()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
