"""Hostile or damaged checkpoints: every reader fails fast with a CheckpointError naming the
problem, never hangs, never exhausts memory, never raises a raw traceback.

Readers: load, inspect, verify (which reports instead of raising), reshard, consolidate, diff.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from funczero import checkpoint
from funczero.testing.states import toy_state

MODEL = "model-shard-00000-of-00001.safetensors"
OPTIM = "optim-shard-00000-of-00001.safetensors"


def _verify(root: Path) -> None:
    report = checkpoint.verify(root)
    if not report.ok:
        raise checkpoint.CorruptCheckpointError([str(p) for p in report.problems])


READERS: dict[str, Callable[[Path, Path], Any]] = {
    "load": lambda root, out: checkpoint.load(root, like=toy_state()),
    "inspect": lambda root, out: checkpoint.inspect(root),
    "verify": lambda root, out: _verify(root),
    "reshard": lambda root, out: checkpoint.reshard(root, out / "resharded", world_size=2),
    "consolidate": lambda root, out: checkpoint.consolidate(root, out / "hf"),
    "diff": lambda root, out: checkpoint.diff(root, root),
}


def every_reader_refuses(root: Path, out: Path, message: str) -> None:
    """Each reader raises a CheckpointError matching ``message``, within seconds."""
    for name, read in READERS.items():
        start = time.monotonic()
        with pytest.raises(checkpoint.CheckpointError, match=message):
            read(root, out / name)
        assert time.monotonic() - start < 10, f"{name} took {time.monotonic() - start:.1f} s"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    checkpoint.save(root, toy_state())
    return root


def edit_index(tag_dir: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    raw = json.loads((tag_dir / "index.json").read_text())
    edit(raw)
    (tag_dir / "index.json").write_text(json.dumps(raw))


# --- numbers in the index that would make a reader loop or allocate ----------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "world, message",
    [(10**12, r"world_size=1000000000000 is more than the 99999"), (99_999, "needs 199998")],
)
def test_a_huge_world_size_fails_every_reader_at_once(
    saved: Path, tmp_path: Path, world: int, message: str
) -> None:
    edit_index(saved / "3", lambda raw: raw.update(world_size=world))
    every_reader_refuses(saved, tmp_path, message)


@pytest.mark.timeout(120)
def test_a_tensor_larger_than_its_files_is_refused_before_anything_is_allocated(
    saved: Path, tmp_path: Path
) -> None:
    def grow(raw: dict[str, Any]) -> None:
        n = 10**15
        raw["params"]["shapes"]["w"] = [n]
        for path in ("master/w", "opt_state/0/mu/w", "opt_state/0/nu/w"):
            raw["tensors"][path]["shape"] = [n]
            raw["tensors"][path]["chunks"][0]["stop"] = n
        raw["tensors"]["params/w"]["shape"] = [n]

    edit_index(saved / "3", grow)
    every_reader_refuses(saved, tmp_path, r"tensors put [\d,]+ bytes in model-shard")


# --- files that are not regular files, or too large to be what they claim ------------------


@pytest.mark.timeout(120)
def test_latest_as_a_fifo_fails_every_reader_instead_of_blocking(
    saved: Path, tmp_path: Path
) -> None:
    (saved / "latest").unlink()
    os.mkfifo(saved / "latest")
    every_reader_refuses(saved, tmp_path, "latest .* is a FIFO .*not a regular file")
    report = checkpoint.verify(saved)
    assert [p.where for p in report.problems] == ["latest"]
    assert checkpoint.list_tags(saved) == ["3"]


@pytest.mark.timeout(120)
def test_latest_linked_to_dev_zero_is_refused_without_reading(saved: Path, tmp_path: Path) -> None:
    (saved / "latest").unlink()
    (saved / "latest").symlink_to("/dev/zero")
    every_reader_refuses(saved, tmp_path, "is a character device")


@pytest.mark.timeout(120)
def test_index_as_a_fifo_fails_every_reader_and_is_not_listed(saved: Path, tmp_path: Path) -> None:
    (saved / "3" / "index.json").unlink()
    os.mkfifo(saved / "3" / "index.json")
    every_reader_refuses(saved, tmp_path, "index.json .* is a FIFO")
    assert checkpoint.list_tags(saved) == []


@pytest.mark.timeout(60)
def test_an_index_larger_than_the_limit_is_refused_before_reading(saved: Path) -> None:
    index = saved / "3" / "index.json"
    os.truncate(index, (1 << 30) + 1)  # sparse: costs no disk, would cost 1 GiB to read
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"1,073,741,825 bytes, more than"):
        checkpoint.read_index(saved / "3")
    assert checkpoint.list_tags(saved) == []


@pytest.mark.timeout(60)
def test_a_shard_header_larger_than_its_tensors_need_is_refused_before_reading(
    saved: Path,
) -> None:
    path = saved / "3" / MODEL
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    pad = 20_000_000  # a valid header, padded as safetensors allows: 20 MB to parse
    path.write_bytes((n + pad).to_bytes(8, "little") + data[8 : 8 + n] + b" " * pad + data[8 + n :])
    start = time.monotonic()
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"header of 20,00\d,\d+ bytes"):
        checkpoint.load(saved, like=toy_state())
    report = checkpoint.verify(saved)
    assert any(p.where == MODEL and "more than the" in p.message for p in report.problems)
    assert time.monotonic() - start < 5


def test_a_shard_that_is_a_fifo_is_reported_not_opened(saved: Path) -> None:
    (saved / "3" / OPTIM).unlink()
    os.mkfifo(saved / "3" / OPTIM)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="is a FIFO"):
        checkpoint.load(saved, like=toy_state())
    assert any("FIFO" in p.message for p in checkpoint.verify(saved).problems)


# --- malformed values: a clear CheckpointError, never a raw traceback ----------------------


def _patch_header(path: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` in the file's JSON header (the tensor bytes stay)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert old in data[8 : 8 + n]
    header = data[8 : 8 + n].replace(old, new, 1)
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n :])


@pytest.mark.parametrize(
    "old, new, message",
    [
        (b'"shape":[16]', b'"shape":[Infinity]', "non-standard JSON constant Infinity"),
        (b'"shape":[16]', b'"shape":[1e400]', "out of range"),
        (b'"shape":[16]', b'"shape":[16.0]', "malformed"),
        (b'"dtype":"F32"', b'"dtype":["F"]', "malformed"),
        (
            b'{"__metadata__"',
            b'{"deep":' + b"[" * 5000 + b"]" * 5000 + b',"__metadata__"',
            "nested",
        ),
    ],
)
def test_malformed_safetensors_headers_are_corrupt_checkpoint_errors(
    saved: Path, old: bytes, new: bytes, message: str
) -> None:
    _patch_header(saved / "3" / MODEL, old, new)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=message):
        checkpoint.load(saved, like=toy_state())
    assert not checkpoint.verify(saved).ok


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw["params"].update(trainable=5), "params.trainable must be a list"),
        (lambda raw: raw["params"].update(trainable=["nope"]), "'nope', not in params.shapes"),
        (lambda raw: raw["params"].update(non_persistent_buffers=7), "non_persistent_buffers"),
        (lambda raw: raw["params"].update(aliases={"x": 3}), "params.aliases must map"),
        (lambda raw: raw["params"]["shapes"].update(w=[4, -4]), "is not a shape"),
        (lambda raw: raw.update(client_state_per_rank=[1, 2]), "client_state_per_rank"),
        (
            lambda raw: raw["tensors"].update(
                running_mean=raw["tensors"].pop("buffers/running_mean")
            ),
            r"a buffer tensor's path must be 'buffers/<name>'",
        ),
        (lambda raw: raw["tensors"]["master/w"].update(shape=[2, 8]), r"parameter 'w' has shape"),
        (lambda raw: raw["tensors"]["master/w"].update(param=["w"]), "param="),
        (lambda raw: raw["tensors"]["params/w"].update(dtype="bfloat16"), "alias of"),
        (lambda raw: raw["tensors"]["rng"].update(group="model"), "does not hold rng"),
        (lambda raw: raw.update(client_state=json.loads("[" * 150 + "]" * 150)), "nested more"),
    ],
)
def test_wrong_typed_or_inconsistent_index_values_are_named(
    saved: Path, tmp_path: Path, edit, message: str
) -> None:
    edit_index(saved / "3", edit)
    every_reader_refuses(saved, tmp_path, message)


def test_deeply_nested_json_is_refused_without_recursion_errors(saved: Path) -> None:
    (saved / "3" / "index.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="nested too deeply to parse"):
        checkpoint.load(saved, like=toy_state())
    assert checkpoint.list_tags(saved) == []


def test_an_edited_rng_shape_is_refused_as_corrupt(saved: Path) -> None:
    # Same element count, so only the file's own record can tell (format version 2).
    edit_index(saved / "3", lambda raw: raw["tensors"]["rng"].update(shape=[2, 2528]))
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"rng: the index says shape"):
        checkpoint.load(saved, like=toy_state())

    def shorter(raw: dict[str, Any]) -> None:
        raw["tensors"]["rng"].update(shape=[5000])
        raw["tensors"]["rng"]["chunks"][0]["stop"] = 5000

    edit_index(saved / "3", shorter)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"rng: .* is torch.uint8 \[5056\]"):
        checkpoint.load(saved, like=toy_state())


# --- an index edited consistently no longer verifies (and consolidate refuses it) ----------


def _reuse_chunk(raw: dict[str, Any]) -> None:
    """An extra buffer that lists running_mean's chunk as its own."""
    raw["tensors"]["buffers/evil"] = json.loads(json.dumps(raw["tensors"]["buffers/running_mean"]))


def _claim_chunk(raw: dict[str, Any]) -> None:
    """The same, keyed under the new path (as a writer would): the file holds no such chunk."""
    _reuse_chunk(raw)
    raw["tensors"]["buffers/evil"]["chunks"][0]["key"] = "buffers/evil"


def _reshape_buffer(raw: dict[str, Any]) -> None:
    raw["tensors"]["buffers/running_mean"]["shape"] = [2, 2]


def _reshape_parameter_everywhere(raw: dict[str, Any]) -> None:
    raw["params"]["shapes"]["w"] = [2, 8]
    for path in ("params/w", "master/w", "opt_state/0/mu/w", "opt_state/0/nu/w"):
        raw["tensors"][path]["shape"] = [2, 8]


@pytest.mark.parametrize(
    "edit", [_reuse_chunk, _claim_chunk, _reshape_buffer, _reshape_parameter_everywhere]
)
def test_an_index_edited_consistently_fails_verify_and_consolidate(
    saved: Path, tmp_path: Path, edit
) -> None:
    edit_index(saved / "3", edit)
    report = checkpoint.verify(saved)
    assert not report.ok
    with pytest.raises(checkpoint.CorruptCheckpointError):
        checkpoint.consolidate(saved, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    with pytest.raises(checkpoint.CheckpointError):  # corrupt, or not the state's shapes
        checkpoint.load(saved, like=toy_state())


def test_chunks_must_be_each_ranks_own_part_in_its_own_file(tmp_path: Path) -> None:
    path = checkpoint.reshard(
        checkpoint.save(tmp_path / "a", toy_state()), tmp_path / "b", world_size=2
    )

    def swap(raw: dict[str, Any]) -> None:  # both chunks still tile [0, 16), in the wrong files
        chunks = raw["tensors"]["master/w"]["chunks"]
        chunks[0]["file"], chunks[1]["file"] = chunks[1]["file"], chunks[0]["file"]

    edit_index(path, swap)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="each rank stores its own part"):
        checkpoint.read_index(path)


# --- fuzzing: a few hundred mutants of a valid index and shard header ----------------------

_HOSTILE = [None, True, False, 0, -1, 1, 3, 2**63, 10**30, 1.5, -0.0, 1e308, "", "x", "\x1b[2J",
            "latest", "../x", [], {}, [0], [1, 2], {"a": 1}, [[[]]]]  # fmt: skip


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _nodes(v, (*path, i))
    return out


def _mutate(raw: Any, rng: random.Random) -> Any:
    raw = json.loads(json.dumps(raw))
    path = rng.choice(_nodes(raw)[1:])
    parent = raw
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    action = rng.random()
    if action < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif action < 0.25 and isinstance(parent, list):
        parent.append(parent[key])
    elif action < 0.35 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] += rng.choice([-1, 1, 7, 10**12])
    else:
        parent[key] = rng.choice(_HOSTILE)
    return raw


@pytest.mark.timeout(240)
def test_fuzzed_indexes_raise_only_checkpoint_errors(saved: Path, tmp_path: Path) -> None:
    tag_dir = saved / "3"
    original = json.loads((tag_dir / "index.json").read_text())
    rng = random.Random(15)
    outcomes = {"refused": 0, "read": 0}
    for i in range(250):
        (tag_dir / "index.json").write_text(json.dumps(_mutate(original, rng)))
        names = ["load", "inspect", "verify"] + (["consolidate", "diff"] if i % 5 == 0 else [])
        for name in names:
            try:
                READERS[name](saved, tmp_path / f"{name}-{i}")
                outcomes["read"] += 1
            except checkpoint.CheckpointError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 500 and outcomes["read"] > 20, outcomes  # both paths exercised


@pytest.mark.timeout(120)
def test_fuzzed_shard_headers_raise_only_checkpoint_errors(saved: Path) -> None:
    path = saved / "3" / MODEL
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    rng = random.Random(16)
    refused = 0
    for _ in range(120):
        text = json.dumps(_mutate(header, rng), separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
        for read in (READERS["load"], READERS["verify"]):
            try:
                read(saved, saved)
            except checkpoint.CheckpointError:
                refused += 1
    assert refused > 120
