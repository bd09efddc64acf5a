"""Saves by 4 gloo ranks (2 ranks: test_checkpoint_resume): each rank writes its own files,
rank 0 commits, failures are collective; the result loads into every world size and stage.

One spawn per world size does all the multi-rank work (starting ranks dominates the cost);
the loads are checked afterwards in this process (``load`` needs no process group).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from funczero import checkpoint
from funczero.checkpoint.tensorfile import TensorFile, TensorFileWriter
from funczero.testing.distributed import run_distributed
from funczero.testing.states import toy_state
from funczero.tree import leaves_with_path

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")


def _state(world: int, rank: int, stage: int, precision: str, **kw):
    return toy_state(
        world_size=world,
        rank=rank,
        stage=stage,
        precision=precision,
        persistent=["b"] if stage == 3 else (),
        **kw,
    )


def _worker(rank: int, world: int, root: str) -> None:
    base = Path(root)
    for precision in PRECISIONS:
        for stage in STAGES:
            state = _state(world, rank, stage, precision)
            path = checkpoint.save(
                base / precision,
                state,
                tag=f"s{stage}",
                client_state={"rank": rank, "shared": [1, 2]},
            )
            assert path == base / precision / f"s{stage}"
    root32 = base / "fp32"

    # A disk that fills on the last rank: every rank raises, nothing is committed or left over.
    real = TensorFileWriter.append
    if rank == world - 1:

        def full(self, part):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

        TensorFileWriter.append = full  # type: ignore[method-assign]
    try:
        checkpoint.save(root32, _state(world, rank, 1, "fp32", step=99), tag="bad")
    except checkpoint.SaveError as e:
        assert f"rank {world - 1}: OSError" in str(e), e
    else:
        raise AssertionError("save must fail on every rank")
    finally:
        TensorFileWriter.append = real  # type: ignore[method-assign]
    torch.distributed.barrier()
    assert checkpoint.latest_tag(root32) == "s3"
    assert sorted(p.name for p in root32.iterdir()) == ["latest", "s0", "s1", "s2", "s3"]

    # An error found by rank 0 while preparing (overwriting latest) is raised on every rank.
    try:
        checkpoint.save(root32, _state(world, rank, 3, "fp32"), tag="s3")
    except checkpoint.CheckpointError as e:
        assert "latest" in str(e)
    else:
        raise AssertionError("overwriting latest must fail on every rank")

    # Loading at the saved world size gives each rank its own RNG and client state back.
    got, client = checkpoint.load(root32, like=_state(world, rank, 2, "fp32", seed=5), tag="s1")
    assert client == {"rank": rank, "shared": [1, 2]}
    assert torch.equal(got.rng, _state(world, rank, 2, "fp32").rng)
    # ... and loading a different stage online works on every rank.
    want = _state(world, rank, 2, "fp32")
    for (p, x), (_, y) in zip(leaves_with_path(got), leaves_with_path(want)):
        assert torch.equal(x, y), p


@pytest.fixture(scope="module", params=[4])
def saved(request, tmp_path_factory) -> tuple[int, Path]:
    world = request.param
    root = tmp_path_factory.mktemp(f"w{world}")
    run_distributed(_worker, world, str(root), timeout=180)
    return world, root


def test_each_rank_writes_its_own_files_with_its_chunks(saved) -> None:
    world, root = saved
    index = checkpoint.read_index(root / "fp32" / "s3")
    assert sorted(index.files) == sorted(
        f"{g}-shard-{r:05d}-of-{world:05d}.safetensors"
        for g in ("model", "optim")
        for r in range(world)
    )
    for name, entry in index.files.items():
        with TensorFile(root / "fp32" / "s3" / name) as f:
            assert f.metadata["rank"] == str(entry.rank)
    chunks = index.tensors["master/emb"].chunks
    assert [index.files[c.file].rank for c in chunks] == list(range(len(chunks)))
    # replicated tensors are split across ranks too, not funnelled through rank 0
    assert len(index.tensors["params/b"].chunks) == min(world, 7)


def test_multi_rank_checkpoints_verify_and_keep_per_rank_client_state(saved) -> None:
    world, root = saved
    for precision in PRECISIONS:
        for stage in STAGES:
            assert checkpoint.verify(root / precision, tag=f"s{stage}").ok
    index = checkpoint.read_index(root / "fp32" / "s0")
    assert index.raw["client_state_per_rank"] == [
        {"rank": r, "shared": [1, 2]} for r in range(world)
    ]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_multi_rank_checkpoints_load_into_every_world_size_and_stage(saved, precision: str) -> None:
    world, root = saved
    for src in STAGES:
        frozen_dtype = _state(world, 0, src, precision).params["frozen"].dtype
        for stage in STAGES:
            for target in (1, 3):
                for rank in range(target):
                    like = _state(target, rank, stage, precision, seed=11)
                    got, client = checkpoint.load(root / precision, like=like, tag=f"s{src}")
                    assert client == {"rank": 0, "shared": [1, 2]}
                    want = _state(target, rank, stage, precision)
                    for (p, x), (_, y) in zip(leaves_with_path(got), leaves_with_path(want)):
                        if p == "params/frozen" and y.dtype != frozen_dtype:
                            y = y.to(frozen_dtype).to(y.dtype)
                        assert p == "rng" or torch.equal(x, y), (src, stage, target, rank, p)


def test_offline_reshard_of_a_multi_rank_checkpoint_matches_online_load(
    saved, tmp_path: Path
) -> None:
    _, root = saved
    out = checkpoint.reshard(root / "bf16", tmp_path, world_size=3, stage=1, tag="s3")
    assert checkpoint.verify(out).ok
    for rank in range(3):
        like = _state(3, rank, 1, "bf16", seed=2)
        offline, _ = checkpoint.load(tmp_path, like=like)
        online, _ = checkpoint.load(root / "bf16", like=like, tag="s3")
        for (p, x), (_, y) in zip(leaves_with_path(offline), leaves_with_path(online)):
            assert torch.equal(x, y), p  # rng included: both derive it the same way
