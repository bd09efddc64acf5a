"""``load(donate=True)``: resuming into the ``like`` state's own tensors.

Checked against the ordinary load (new tensors), bit for bit, across world sizes and stages;
the donated state is unusable after; damage found before writing leaves it untouched, damage
found while writing says it was overwritten; the memory is one state, not two.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from funczero import DonatedStateError, checkpoint
from funczero.testing.distributed import run_distributed
from funczero.testing.states import toy_state
from funczero.tree import leaves_with_path


def _like(world: int, rank: int, stage: int, precision: str = "fp32", seed: int = 7):
    return toy_state(
        world_size=world,
        rank=rank,
        stage=stage,
        precision=precision,
        seed=seed,
        persistent=["b"] if stage == 3 else (),
    )


def _assert_identical(got, want) -> None:
    """Every leaf (the RNG included) bitwise equal, same dtype and shape."""
    a, b = leaves_with_path(got), leaves_with_path(want)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        x, y = (t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (x, y))
        assert torch.equal(x, y), path


def _check_in_place(root: Path, world: int, rank: int, stage: int, precision: str) -> None:
    want, client_want = checkpoint.load(root, like=_like(world, rank, stage, precision))
    like = _like(world, rank, stage, precision)
    storage = {path: x.data_ptr() for path, x in leaves_with_path(like)}
    got, client = checkpoint.load(root, like=like, donate=True)
    _assert_identical(got, want)
    assert client == client_want
    assert {path: x.data_ptr() for path, x in leaves_with_path(got)} == storage
    assert like.donated
    with pytest.raises(DonatedStateError):
        like.params  # noqa: B018


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("src_stage", [0, 3])
def test_in_place_load_equals_the_ordinary_load_at_every_world_size_and_stage(
    tmp_path: Path, precision: str, src_stage: int
) -> None:
    src = checkpoint.save(tmp_path / "w1", toy_state(stage=src_stage, precision=precision))
    # A world-2 checkpoint without spawning ranks: reshard's output is what 2 ranks would save.
    two = checkpoint.reshard(src, tmp_path / "w2", world_size=2, stage=2)
    for root in (tmp_path / "w1", two.parent):
        for stage in range(4):
            for world in (1, 2, 3):
                for rank in range(world):
                    _check_in_place(root, world, rank, stage, precision)


def test_aliasing_of_like_is_kept_by_an_in_place_load(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state(stage=1))
    like = _like(2, 1, 3)
    shared = like.master["w"]
    got, _ = checkpoint.load(tmp_path, like=like, donate=True)
    assert got.params["w"] is got.master["w"] is shared


def test_a_donated_state_cannot_be_loaded_into_again(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state())
    like = toy_state(seed=1)
    checkpoint.load(tmp_path, like=like, donate=True)
    with pytest.raises(DonatedStateError):
        checkpoint.load(tmp_path, like=like, donate=True)


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _flip_data_byte(path: Path, key: str) -> None:
    """Flip one byte in the middle of tensor ``key``'s data (the header stays valid)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + n])[key]["data_offsets"]
    raw[8 + n + (begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_damaged_chunk_found_while_reading_names_it_and_says_the_state_was_overwritten(
    tmp_path: Path,
) -> None:
    path = checkpoint.save(tmp_path, toy_state())
    _flip_data_byte(path / "optim-shard-00000-of-00001.safetensors", "opt_state/0/mu/w")
    before = _digests(path)
    like = toy_state(seed=1)
    with pytest.raises(checkpoint.CorruptCheckpointError) as info:
        checkpoint.load(tmp_path, like=like, donate=True)
    message = str(info.value)
    assert "tensor opt_state/0/mu/w" in message
    assert "optim-shard-00000-of-00001.safetensors fail their checksum" in message
    assert "partially overwritten and is now marked donated" in message
    assert like.donated
    assert _digests(path) == before  # the checkpoint is only read
    # The ordinary load reports the same damage and leaves like alone.
    fresh = toy_state(seed=1)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="opt_state/0/mu/w") as info:
        checkpoint.load(tmp_path, like=fresh)
    assert "marked donated" not in str(info.value) and not fresh.donated


@pytest.mark.parametrize("damage", ["truncate", "missing", "mismatch"])
def test_damage_found_before_writing_leaves_the_donated_state_untouched(
    tmp_path: Path, damage: str
) -> None:
    path = checkpoint.save(tmp_path, toy_state(stage=1))
    optim = path / "optim-shard-00000-of-00001.safetensors"
    if damage == "truncate":
        optim.write_bytes(optim.read_bytes()[:-16])
    elif damage == "missing":
        optim.unlink()
    like = _like(1, 0, 1, seed=4) if damage != "mismatch" else toy_state(optimizer="sgd", seed=4)
    expected = {p: x.clone() for p, x in leaves_with_path(like)}
    error = (
        checkpoint.StateMismatchError if damage == "mismatch" else checkpoint.CorruptCheckpointError
    )
    with pytest.raises(error) as info:
        checkpoint.load(tmp_path, like=like, donate=True)
    assert "marked donated" not in str(info.value)
    assert not like.donated
    for p, x in leaves_with_path(like):
        assert torch.equal(x, expected[p]), p


def test_an_interrupted_in_place_load_marks_the_state_donated(tmp_path: Path, monkeypatch) -> None:
    from funczero.checkpoint import tensorfile

    checkpoint.save(tmp_path, toy_state())
    real, calls = tensorfile.TensorFile.read_into, []

    def failing(self, key, dst, lo, hi):
        calls.append(key)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real(self, key, dst, lo, hi)

    monkeypatch.setattr(tensorfile.TensorFile, "read_into", failing)
    like = toy_state(seed=1)
    with pytest.raises(checkpoint.CheckpointError, match=r"OSError.*Input/output error.*partially"):
        checkpoint.load(tmp_path, like=like, donate=True)
    assert like.donated


def _worker(rank: int, world: int, root: str) -> None:
    for stage in (1, 3):
        state = _like(world, rank, stage, seed=0)
        checkpoint.save(Path(root) / f"s{stage}", state, client_state={"rank": rank})
    for stage in (1, 3):
        _check_in_place(Path(root) / f"s{stage}", world, rank, 3 - stage + 1, "fp32")


def test_in_place_loads_on_two_gloo_ranks_and_reshards_to_one(tmp_path: Path) -> None:
    run_distributed(_worker, 2, str(tmp_path), timeout=120)
    for stage in (1, 3):  # a world-2 checkpoint into world 1, and back to both ranks of 2
        _check_in_place(tmp_path / f"s{stage}", 1, 0, 0, "fp32")
        _check_in_place(tmp_path / f"s{stage}", 2, 1, 2, "fp32")


_PEAK = textwrap.dedent(
    """
    import json, re, sys
    import torch
    from funczero import checkpoint
    from funczero.testing.states import toy_state
    from funczero.tree import leaves_with_path

    def hwm():
        text = open("/proc/self/status").read()
        return int(re.search(r"VmHWM:\\s+(\\d+)", text).group(1)) * 1024

    shapes = {f"l{i}.weight": (1024, 1024) for i in range(8)}
    like = toy_state(shapes=shapes, seed=1)
    state_bytes = sum(x.nbytes for x in {id(x): x for _, x in leaves_with_path(like)}.values())
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
    base = hwm()
    checkpoint.load(sys.argv[1], like=like, donate=sys.argv[2] == "donate")
    print(json.dumps({"extra": hwm() - base, "state": state_bytes}))
    """
)


def _peak(root: Path, mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(root), mode],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        # A fixed threshold keeps large blocks mmapped: freed memory leaves RSS at once, so
        # the measure cannot hide a new state in memory freed while building ``like``.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs"
)
def test_an_in_place_load_needs_no_second_state(tmp_path: Path) -> None:
    shapes = {f"l{i}.weight": (1024, 1024) for i in range(8)}  # 8 x 4 MiB, x3 with Adam
    checkpoint.save(tmp_path, toy_state(shapes=shapes))
    donated, fresh = _peak(tmp_path, "donate"), _peak(tmp_path, "new")
    chunk = 4 << 20
    # The ordinary load allocates the whole state again (the measure sees it) ...
    assert fresh["extra"] > 0.8 * donated["state"], (fresh, donated)
    # ... the in-place load one chunk plus slack (threads' stacks, allocator, page tables).
    assert donated["extra"] < chunk + (24 << 20), (donated, fresh)


def test_a_strided_or_grad_requiring_leaf_is_loaded_in_place(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, toy_state())
    want, _ = checkpoint.load(tmp_path, like=toy_state(seed=1))
    like = toy_state(seed=1)
    like.buffers["running_mean"] = torch.zeros(8)[::2]  # not contiguous
    like.master["b"].requires_grad_(True)
    strided, grad = like.buffers["running_mean"], like.master["b"]
    got, _ = checkpoint.load(tmp_path, like=like, donate=True)
    assert got.buffers["running_mean"] is strided and got.master["b"] is grad
    _assert_identical(got, want)
