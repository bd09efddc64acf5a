"""Reading flat element ranges of a checkpoint's tensors, checked and streamed.

:class:`ShardReader` is what every consumer uses (load, reshard, consolidate, diff): it opens
shard files lazily, refuses files of another checkpoint (and, from format version 2, chunks
whose file records another shape or range than the index), reads byte ranges in blocks straight
into destination tensors, and checks the SHA-256 of every chunk it reads whole, hashing on
helper threads while it reads (:mod:`funczero.checkpoint.hashing`). ``per_rank`` tensors read
as a range are rank 0's copy.

Example:
    >>> import tempfile
    >>> from funczero.checkpoint import save, read_index
    >>> from funczero.testing.states import toy_state
    >>> path = save(tempfile.mkdtemp(), toy_state())
    >>> index = read_index(path)
    >>> with ShardReader(path, index) as reader:
    ...     reader.read_full(index.tensors["params/b"]).shape
    torch.Size([7])
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from funczero.checkpoint.chunks import (
    Record,
    header_limit,
    overlaps,
    parse_records,
    record_mismatch,
)
from funczero.checkpoint.entry import Chunk, TensorEntry
from funczero.checkpoint.errors import CorruptCheckpointError, StateMismatchError
from funczero.checkpoint.hashing import ChunkHash, lanes
from funczero.checkpoint.index import Index
from funczero.checkpoint.safe_io import safe_child
from funczero.checkpoint.tensorfile import TensorFile, _as_bytes

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; only for annotations

__all__ = ["BLOCK_ELEMS", "LOAD_BLOCK_BYTES", "ShardReader", "derive_rng"]

BLOCK_ELEMS = 1 << 20
"""Elements per streamed block (4 MiB of fp32): bounds the memory of streaming tools."""
LOAD_BLOCK_BYTES = 16 << 20
"""Bytes per block of :meth:`ShardReader.read_range`: the unit of hashing while reading, and
the size of a staging buffer (destinations on a GPU, or of another dtype)."""


class _Staging:
    """Two staging buffers used in turn; one is reused only once its bytes are hashed."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._busy: list[concurrent.futures.Future[object] | None] = [None, None]
        self._next = 0
        self._current = 0

    def take(self, dtype: torch.dtype, numel: int, *, pinned: bool) -> torch.Tensor:
        """A buffer of ``numel`` elements of ``dtype`` (at most :data:`LOAD_BLOCK_BYTES`)."""
        i = self._next
        self._next = 1 - i
        if self._busy[i] is not None:
            concurrent.futures.wait([self._busy[i]])  # type: ignore[list-item]
            self._busy[i] = None
        buf = self._buffers[i]
        if buf is None or (pinned and not buf.is_pinned()):
            buf = torch.empty(LOAD_BLOCK_BYTES, dtype=torch.uint8, pin_memory=pinned)
            self._buffers[i] = buf
        self._current = i
        return buf[: numel * dtype.itemsize].view(dtype)

    def hold(self, done: concurrent.futures.Future[object]) -> None:
        """Keep the buffer last taken until ``done`` (its bytes are being hashed)."""
        self._busy[self._current] = done


class ShardReader:
    """Reads flat element ranges of a checkpoint's tensors, opening files lazily.

    Args:
        tag_dir: the checkpoint directory.
        index: its validated index.
        verify: check the SHA-256 of every chunk that is read whole.
    """

    def __init__(self, tag_dir: Path, index: Index, *, verify: bool = True) -> None:
        self.tag_dir = tag_dir
        self.index = index
        self.verify = verify
        self._files: dict[str, TensorFile] = {}
        self._records: dict[str, dict[str, Record]] = {}
        self._pending: collections.deque[
            tuple[concurrent.futures.Future[str], TensorEntry, Chunk]
        ] = collections.deque()
        self._streams: list[ChunkHash] = []
        self._staging = _Staging()
        self.bytes_read = 0

    def file(self, name: str) -> TensorFile:
        """The open file ``name``, checked to belong to this checkpoint."""
        if name not in self._files:
            path = safe_child(self.tag_dir, name)
            entry = self.index.files[name]
            if not path.exists():
                raise CorruptCheckpointError(
                    f"shard file {name} is missing (written by rank {entry.rank})",
                    where=str(self.tag_dir),
                )
            f = TensorFile(path, max_header=header_limit(self.index.chunks_in(name)))
            try:
                self._check_file(f, name)
            except BaseException:
                f.close()
                raise
            self._files[name] = f
        return self._files[name]

    def _check_file(self, f: TensorFile, name: str) -> None:
        entry = self.index.files[name]
        meta = f.metadata
        if meta.get("checkpoint_id") != self.index.checkpoint_id:
            raise CorruptCheckpointError(
                f"shard file {name} belongs to another checkpoint (its checkpoint_id is "
                f"{meta.get('checkpoint_id')!r}, the index's {self.index.checkpoint_id!r}); "
                "restore the file from the save that wrote this index",
                where=str(self.tag_dir),
            )
        if meta.get("rank") != str(entry.rank) or f.size != entry.bytes:
            raise CorruptCheckpointError(
                f"shard file {name}: rank {meta.get('rank')!r}, {f.size} bytes; the index "
                f"expects rank {entry.rank}, {entry.bytes} bytes",
                where=str(self.tag_dir),
            )
        if self.index.has_file_records:
            try:
                self._records[name] = parse_records(meta)
            except ValueError as e:
                raise CorruptCheckpointError(
                    f"shard file {name}: {e}", where=str(self.tag_dir)
                ) from e

    def read_range(self, entry: TensorEntry, a: int, b: int, dst: torch.Tensor) -> None:
        """Fill the 1-D tensor ``dst`` with elements ``[a, b)`` of ``entry``, in blocks.

        ``dst`` may have another dtype than the saved one (values are cast) and live on any
        device. Contiguous CPU destinations of the saved dtype are read into directly; others
        go through a staging buffer of :data:`LOAD_BLOCK_BYTES` (two in flight), so a read
        never needs more memory than that on top of ``dst``. Chunks read whole are hashed on
        helper threads (:mod:`~funczero.checkpoint.hashing`) while the next blocks are read;
        :meth:`finish` (called on leaving the ``with`` block) waits for them and raises on a
        mismatch.
        """
        entry = self.index.resolve(entry)
        saved = entry.dtype
        direct = dst.device.type == "cpu" and dst.dtype == saved and dst.is_contiguous()
        step = max(1, LOAD_BLOCK_BYTES // saved.itemsize)
        chunks = _range_chunks(entry)
        for i, lo, hi in overlaps([(c.start, c.stop) for c in chunks], a, b):
            c = chunks[i]
            f = self._chunk_file(entry, c)
            whole = self.verify and lo == c.start and hi == c.stop
            stream = lanes().start() if whole else None
            if stream is not None:
                self._streams.append(stream)
            for s in range(lo, hi, step):
                t = min(hi, s + step)
                part = dst[s - a : t - a]
                if direct:
                    f.read_into(c.key, part, s - c.start, t - c.start)
                    raw = part
                else:
                    raw = self._staging.take(saved, t - s, pinned=dst.device.type == "cuda")
                    f.read_into(c.key, raw, s - c.start, t - c.start)
                    part.copy_(raw)
                self.bytes_read += raw.numel() * saved.itemsize
                if stream is not None:
                    done = stream.update(_as_bytes(raw))
                    if not direct:
                        self._staging.hold(done)
            if stream is not None:
                self._pending.append((stream.digest(), entry, c))
                self._check_done()

    def _check_done(self) -> None:
        """Raise now for a chunk already hashed and found damaged (the rest need not be read)."""
        while self._pending and self._pending[0][0].done():
            digest, e, c = self._pending.popleft()
            if digest.result() != c.sha256:
                raise self._checksum_error(e, c)

    def check_range(self, entry: TensorEntry, a: int, b: int) -> None:
        """Open and check the files of the chunks holding elements ``[a, b)``, reading no data.

        Raises what reading them would for a missing, truncated or foreign file, or a chunk
        the file holds otherwise than the index says, so a caller can refuse before it
        writes anything.
        """
        entry = self.index.resolve(entry)
        chunks = _range_chunks(entry)
        for i, _, _ in overlaps([(c.start, c.stop) for c in chunks], a, b):
            self._chunk_file(entry, chunks[i])

    def check_rank(self, entry: TensorEntry, rank: int) -> None:
        """:meth:`check_range` for rank ``rank``'s copy of a ``per_rank`` tensor."""
        self._chunk_file(entry, entry.chunks[rank])

    def iter_range(
        self, entry: TensorEntry, a: int, b: int, block_elems: int = BLOCK_ELEMS
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, values)`` blocks covering elements ``[a, b)`` of ``entry`` in order.

        Chunks traversed whole are checked against their SHA-256 (incrementally); a mismatch
        raises after the chunk's last block, so consumers must not commit before the end.
        """
        entry = self.index.resolve(entry)
        chunks = _range_chunks(entry)
        for i, lo, hi in overlaps([(c.start, c.stop) for c in chunks], a, b):
            c = chunks[i]
            f = self._chunk_file(entry, c)
            h = hashlib.sha256() if self.verify and lo == c.start and hi == c.stop else None
            for s in range(lo, hi, block_elems):
                piece = f.read(c.key, s - c.start, min(hi, s + block_elems) - c.start)
                self.bytes_read += piece.numel() * piece.element_size()
                if h is not None:
                    h.update(_as_bytes(piece))
                yield s, piece
            if h is not None and h.hexdigest() != c.sha256:
                raise self._checksum_error(entry, c)

    def _chunk_file(self, entry: TensorEntry, c: Chunk) -> TensorFile:
        """The file of chunk ``c``, checked to hold it as the index describes it."""
        f = self.file(c.file)
        info = f.info(c.key)
        if info.dtype != entry.dtype or info.shape != (c.numel,):
            raise CorruptCheckpointError(
                f"tensor {entry.path}: {c.file}[{c.key!r}] is {info.dtype} {list(info.shape)}, "
                f"the index says {entry.dtype_name} [{c.numel}]",
                where=str(self.tag_dir),
            )
        records = self._records.get(c.file)
        problem = None if records is None else record_mismatch(records, entry, c)
        if problem:
            raise CorruptCheckpointError(f"tensor {entry.path}: {problem}", where=str(self.tag_dir))
        return f

    def _checksum_error(self, entry: TensorEntry, c: Chunk) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"tensor {entry.path}: elements [{c.start}, {c.stop}) in {c.file} fail their "
            "checksum (flipped or overwritten bytes); run `funczero ckpt verify` for a full "
            "report and load an older tag",
            where=str(self.tag_dir),
        )

    def read_full(self, entry: TensorEntry, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor in its global shape."""
        out = torch.empty(entry.numel, dtype=dtype or self.index.resolve(entry).dtype)
        self.read_range(entry, 0, entry.numel, out)
        return out.view(entry.shape)

    def read_rank(self, entry: TensorEntry, rank: int) -> torch.Tensor:
        """Rank ``rank``'s own copy of a ``per_rank`` tensor."""
        c = entry.chunks[rank]
        out = self._chunk_file(entry, c).read(c.key)
        if self.verify and hashlib.sha256(_as_bytes(out)).hexdigest() != c.sha256:
            raise CorruptCheckpointError(
                f"tensor {entry.path} of rank {rank} in {c.file} fails its checksum",
                where=str(self.tag_dir),
            )
        return out.view(entry.shape)

    def finish(self) -> None:
        """Wait for the pending checksums of :meth:`read_range`; raise on the first mismatch."""
        pending, self._pending = self._pending, collections.deque()
        self._streams.clear()
        bad = [(e, c) for digest, e, c in pending if digest.result() != c.sha256]
        if bad:
            raise self._checksum_error(*bad[0])

    def close(self) -> None:
        for stream in self._streams:  # never leave a helper thread reading freed memory
            if stream.last is not None:
                concurrent.futures.wait([stream.last])
        self._streams.clear()
        self._pending.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()


def _range_chunks(entry: TensorEntry) -> tuple[Chunk, ...]:
    """The chunks that tile ``entry``'s elements: all of them, or rank 0's copy (per_rank)."""
    return entry.chunks[:1] if entry.placement == "per_rank" else entry.chunks


def derive_rng(saved: torch.Tensor, rank: int, like: torch.Tensor) -> torch.Tensor:
    """A generator state for ``rank`` derived deterministically from a saved one.

    Used when the world size changed, so rank ``r`` has no saved state of its own: the seed is
    the SHA-256 of the saved rank-0 state and ``r``. ``like`` says which generator kind (CPU
    Mersenne Twister, or the 16-byte CUDA Philox seed/offset).
    """
    digest = hashlib.sha256(_as_bytes(saved.contiguous()).tobytes() + rank.to_bytes(8, "little"))
    seed = int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)
    cpu = torch.Generator().get_state()
    if like.numel() == cpu.numel():
        g = torch.Generator()
        g.manual_seed(seed)
        return g.get_state()
    if like.numel() == 16:  # CUDA Philox: uint64 seed, uint64 offset
        return torch.frombuffer(bytearray(seed.to_bytes(8, "little") + bytes(8)), dtype=torch.uint8)
    raise StateMismatchError(
        mismatched=[f"rng: cannot derive a generator state of {like.numel()} bytes"]
    )
