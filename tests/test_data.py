"""funczero.data.DistributedBatchLoader: disjoint, world-size-invariant, reproducible, resumable."""

from __future__ import annotations

import json
from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch

from funczero.config import Config
from funczero.data import DistributedBatchLoader, default_collate


class Indexed:
    """A dataset whose sample i is i (so batches show which samples they hold)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return torch.tensor(i)


def loaders(n: int, world: int, **kwargs: Any) -> list[DistributedBatchLoader]:
    return [DistributedBatchLoader(Indexed(n), rank=r, world_size=world, **kwargs)
            for r in range(world)]


def global_step(ranks: list[DistributedBatchLoader]) -> list[int]:
    """Concatenate every rank's next step batch in rank order."""
    return torch.cat([loader.next_batch() for loader in ranks]).tolist()


def test_ranks_are_disjoint_and_cover_each_epoch() -> None:
    ranks = loaders(103, 4, micro_batch_size=3, grad_accum=2, seed=5)
    steps = ranks[0].steps_per_epoch
    assert steps == 103 // 24
    for _epoch in range(3):
        seen: list[int] = []
        for _ in range(steps):
            per_rank = [loader.next_batch().tolist() for loader in ranks]
            assert all(len(b) == 6 for b in per_rank)
            flat = [i for b in per_rank for i in b]
            assert len(set(flat)) == len(flat)  # disjoint within the step
            seen += flat
        assert len(set(seen)) == len(seen) == steps * 24  # no sample twice in an epoch
        assert all(0 <= i < 103 for i in seen)


@pytest.mark.parametrize("shuffle", [True, False])
def test_global_batch_is_the_same_for_world_sizes_1_2_4(shuffle: bool) -> None:
    # the same global batch of 8 split as 1x(2*4), 2x(2*2), 4x(2*1)
    runs = {
        world: [global_step(ranks) for _ in range(12)]
        for world, ranks in (
            (1, loaders(50, 1, micro_batch_size=2, grad_accum=4, seed=3, shuffle=shuffle)),
            (2, loaders(50, 2, micro_batch_size=2, grad_accum=2, seed=3, shuffle=shuffle)),
            (4, loaders(50, 4, micro_batch_size=2, grad_accum=1, seed=3, shuffle=shuffle)),
        )
    }
    assert runs[1] == runs[2] == runs[4]
    single = DistributedBatchLoader(Indexed(50), micro_batch_size=8, seed=3, shuffle=shuffle)
    assert runs[1] == [single.next_batch().tolist() for _ in range(12)]


def test_rank_slice_and_micro_batch_layout() -> None:
    loader = DistributedBatchLoader(Indexed(64), micro_batch_size=2, grad_accum=3, rank=1,
                                    world_size=2, seed=0)
    g = loader.global_indices()
    batch = loader.next_batch()
    assert batch.tolist() == g[6:12]  # rank 1 = global_batch[r*P:(r+1)*P], P = 2*3
    micro = batch.split(2)  # the train step splits dim 0 into grad_accum micro-batches
    assert [m.tolist() for m in micro] == [g[6:8], g[8:10], g[10:12]]


def test_shuffle_is_reproducible_and_independent_of_global_rng() -> None:
    a = DistributedBatchLoader(Indexed(40), micro_batch_size=4, seed=11)
    torch.manual_seed(0)
    first = [a.next_batch().tolist() for _ in range(25)]
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    b = DistributedBatchLoader(Indexed(40), micro_batch_size=4, seed=11)
    second = [b.next_batch().tolist() for _ in range(25)]
    assert first == second
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG was not touched
    c = DistributedBatchLoader(Indexed(40), micro_batch_size=4, seed=12)
    assert [c.next_batch().tolist() for _ in range(25)] != first
    # epochs are reshuffled, and seed s / epoch e does not replay seed s+1 / epoch e-1
    assert first[0:10] != first[10:20]
    assert first[10:20] != [c.next_batch().tolist() for _ in range(10)]


@pytest.mark.parametrize("stop", [3, 7, 10, 17])  # mid-epoch, boundary, next epoch
def test_resume_continues_with_exactly_the_next_batch(stop: int) -> None:
    kwargs = {"micro_batch_size": 3, "grad_accum": 2, "seed": 9}
    full = loaders(45, 2, **kwargs)  # 45 // 12 = 3 steps per epoch
    reference = [global_step(full) for _ in range(stop + 8)]
    run = loaders(45, 2, **kwargs)
    for _ in range(stop):
        global_step(run)
    state = json.loads(json.dumps(run[0].state_dict()))
    assert state["position"] == stop and state["epoch"] == stop // 3
    resumed = loaders(45, 2, **kwargs)
    for loader in resumed:
        loader.load_state_dict(state)
    assert [global_step(resumed) for _ in range(8)] == reference[stop:]
    by_arg = loaders(45, 2, position=stop, **kwargs)
    assert [global_step(by_arg) for _ in range(8)] == reference[stop:]


def test_resume_at_another_world_size_with_the_same_global_batch() -> None:
    four = loaders(60, 4, micro_batch_size=2, seed=1)
    reference = [global_step(four) for _ in range(15)]
    two = loaders(60, 2, micro_batch_size=4, seed=1)
    for _ in range(5):
        global_step(two)
    state = two[0].state_dict()
    resumed = loaders(60, 4, micro_batch_size=2, seed=1)
    for loader in resumed:
        loader.load_state_dict(state)
    assert [global_step(resumed) for _ in range(10)] == reference[5:]


def test_iteration_yields_one_epoch_then_the_next() -> None:
    loader = DistributedBatchLoader(Indexed(20), micro_batch_size=3, shuffle=False)
    assert len(loader) == 6
    first = [b.tolist() for b in loader]
    assert first == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [15, 16, 17]]
    assert loader.epoch == 1 and loader.position == 6
    assert len(list(loader)) == 6
    loader.position = 8  # mid-epoch: the loop finishes the epoch
    assert len(list(loader)) == 4
    assert len(list(loader.iter_steps(14))) == 14 and loader.position == 26


def test_drop_last_false_wraps_within_the_epoch() -> None:
    loader = DistributedBatchLoader(Indexed(10), micro_batch_size=2, world_size=2, rank=0,
                                    shuffle=False, drop_last=False)
    assert loader.steps_per_epoch == 3
    assert loader.global_indices(2) == [8, 9, 0, 1]
    assert loader.global_indices(3) == [0, 1, 2, 3]  # the next epoch starts afresh
    tiny = DistributedBatchLoader(Indexed(3), micro_batch_size=4, shuffle=False, drop_last=False)
    assert tiny.next_batch().tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1, got 0"),
        ({"micro_batch_size": 2, "grad_accum": 0}, "grad_accum must be an integer >= 1, got 0"),
        ({"micro_batch_size": 2, "world_size": 2, "rank": 2}, "rank 2 is out of range"),
        ({"micro_batch_size": 2, "seed": -1}, "seed must be an integer >= 0"),
        ({"micro_batch_size": 2, "position": -3}, "position must be an integer >= 0"),
        ({"micro_batch_size": 4, "grad_accum": 2, "world_size": 2},
         "the dataset has 10 samples, fewer than one global batch of 16 = micro_batch_size 4 * "
         "grad_accum 2 * world_size 2"),
    ],
)
def test_bad_arguments_are_explained(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError) as info:
        DistributedBatchLoader(Indexed(10), **kwargs)
    assert needle in str(info.value)


def test_bad_dataset_and_mismatched_state() -> None:
    with pytest.raises(TypeError, match="map-style"):
        DistributedBatchLoader(iter(range(5)), micro_batch_size=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        DistributedBatchLoader([], micro_batch_size=1)
    state = DistributedBatchLoader(Indexed(10), micro_batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved with seed=1 but this loader has seed=2"):
        DistributedBatchLoader(Indexed(10), micro_batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size=2"):
        DistributedBatchLoader(Indexed(10), micro_batch_size=5, seed=1).load_state_dict(state)


def test_default_collate_structures() -> None:
    Pair = namedtuple("Pair", "x y")
    samples = [{"img": torch.full((2, 2), float(i)), "label": i, "w": 0.5, "meta": (str(i), [i])}
               for i in range(3)]
    batch = default_collate(samples)
    assert batch["img"].shape == (3, 2, 2) and batch["label"].dtype == torch.int64
    assert batch["w"].dtype == torch.get_default_dtype()
    assert batch["meta"][0] == ["0", "1", "2"] and batch["meta"][1][0].tolist() == [0, 1, 2]
    pairs = default_collate([Pair(torch.zeros(1), np.ones(2)), Pair(torch.ones(1), np.ones(2))])
    assert isinstance(pairs, Pair) and pairs.y.shape == (2, 2)
    with pytest.raises(TypeError, match=r"sample\['img'\]"):
        default_collate([{"img": torch.zeros(2)}, {"img": torch.zeros(3)}])
    with pytest.raises(TypeError, match="keys"):
        default_collate([{"a": 1}, {"b": 1}])


def test_from_config_uses_the_batch_keys() -> None:
    cfg = Config.load({"train_batch_size": 16, "gradient_accumulation_steps": 2,
                       "funczero": {"seed": 4}}, world_size=2)
    loader = DistributedBatchLoader.from_config(Indexed(50), cfg, rank=1)
    assert (loader.micro_batch_size, loader.grad_accum, loader.world_size) == (4, 2, 2)
    assert loader.global_batch_size == cfg.train_batch_size
    assert loader.seed == 4 and loader.drop_last is False  # DeepSpeed's dataloader_drop_last


def test_only_this_ranks_samples_are_read() -> None:
    data = Indexed(64)
    loader = DistributedBatchLoader(data, micro_batch_size=4, world_size=4, rank=2)
    loader.next_batch()
    assert data.reads == 4
