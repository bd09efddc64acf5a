"""ShardReader: ranges read in blocks (hashed on helper threads while reading) and streamed reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from funczero import checkpoint
from funczero.checkpoint.reader import ShardReader
from funczero.testing.states import toy_state

SHAPES = {"w": (64, 64), "b": (64,)}


def _flip(path: Path, key: str) -> None:
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    _, end = json.loads(raw[8 : 8 + n])[key]["data_offsets"]
    raw[8 + n + end - 3] ^= 0x01  # near the end: only the last block of the chunk differs
    path.write_bytes(bytes(raw))


def test_streamed_blocks_are_the_values_and_a_damaged_chunk_raises_after_its_last_block(
    tmp_path: Path,
) -> None:
    state = toy_state(shapes=SHAPES, frozen=())
    path = checkpoint.save(tmp_path, state)
    index = checkpoint.read_index(path)
    entry = index.tensors["master/w"]
    with ShardReader(path, index) as reader:  # 4096 elements in blocks of 100
        blocks = list(reader.iter_range(entry, 0, entry.numel, block_elems=100))
    assert [s for s, _ in blocks] == list(range(0, 4096, 100))
    assert torch.equal(torch.cat([x for _, x in blocks]), state.master["w"].reshape(-1))

    _flip(path / "model-shard-00000-of-00001.safetensors", "master/w")
    seen = []
    with (
        ShardReader(path, index) as reader,
        pytest.raises(checkpoint.CorruptCheckpointError, match="tensor master/w: "),
    ):
        for s, _ in reader.iter_range(entry, 0, entry.numel, block_elems=100):
            seen.append(s)
    assert len(seen) == 41  # every block was yielded before the chunk was found damaged
    with pytest.raises(checkpoint.CorruptCheckpointError, match="tensor master/w: "):
        checkpoint.reshard(tmp_path, tmp_path / "out", world_size=2)
    assert not (tmp_path / "out" / "3").exists()


def test_a_range_of_many_blocks_reads_into_any_dtype_and_checks_every_chunk(
    tmp_path: Path, monkeypatch
) -> None:
    from funczero.checkpoint import reader as reader_module

    monkeypatch.setattr(reader_module, "LOAD_BLOCK_BYTES", 1000)  # many blocks, staging reused
    state = toy_state(shapes=SHAPES, frozen=())
    path = checkpoint.save(tmp_path, state)
    index = checkpoint.read_index(path)
    entry = index.tensors["master/w"]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = torch.empty(entry.numel, dtype=dtype)
        with ShardReader(path, index) as reader:
            reader.read_range(entry, 0, entry.numel, out)
        assert torch.equal(out, state.master["w"].reshape(-1).to(dtype)), dtype
    _flip(path / "model-shard-00000-of-00001.safetensors", "master/w")
    for dtype in (torch.float32, torch.float64):
        with (
            pytest.raises(checkpoint.CorruptCheckpointError, match="tensor master/w: "),
            ShardReader(path, index) as reader,
        ):
            reader.read_range(entry, 0, entry.numel, torch.empty(entry.numel, dtype=dtype))
