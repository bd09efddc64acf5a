"""funczero.data.DistributedBatchLoader: disjoint, world-size-invariant, reproducible, resumable."""

from __future__ import annotations

import json
import math
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import funczero
from funczero import checkpoint
from funczero.config import Config
from funczero.data import DistributedBatchLoader, default_collate
from funczero.testing import run_distributed


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


def epoch_orders(n: int, epochs: int, **kwargs: Any) -> list[list[int]]:
    """Each epoch's sample order, read through a loader whose global batch is one sample."""
    one = DistributedBatchLoader(Indexed(n), micro_batch_size=1, **kwargs)
    return [[one.next_batch().item() for _ in range(n)] for _ in range(epochs)]


def expected_after_resume(
    orders: list[list[int]], epoch: int, offset: int, batch: int, steps: int, drop_last: bool
) -> list[list[int]]:
    """Global batches of ``batch`` samples from sample ``offset`` of ``epoch`` on (the rule the
    module docstring states: the rest of that epoch, then whole epochs)."""
    n = len(orders[0])
    out: list[list[int]] = []
    while len(out) < steps:
        order = orders[epoch]
        while offset < n and len(out) < steps:
            if drop_last and offset + batch > n:
                break
            out.append([order[(offset + j) % n] for j in range(batch)])
            offset += batch
        epoch, offset = epoch + 1, 0
    return out


# (per-rank micro-batch, world size) saved, then resumed: a fixed per-rank config on more or
# fewer ranks changes the global batch size (8 -> 12, 12 -> 8, 8 -> 20).
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize(
    ("saved", "resumed"), [((4, 2), (4, 3)), ((4, 3), (4, 2)), ((4, 2), (5, 4))]
)
@pytest.mark.parametrize("stop", [1, 3, 4, 9])  # mid-epoch, near its end, next epochs
def test_resume_with_another_global_batch_continues_at_the_saved_sample(
    drop_last: bool, saved: tuple[int, int], resumed: tuple[int, int], stop: int
) -> None:
    kwargs = {"seed": 4, "drop_last": drop_last}
    run = loaders(45, saved[1], micro_batch_size=saved[0], **kwargs)
    consumed = [global_step(run) for _ in range(stop)]
    state = json.loads(json.dumps(run[0].state_dict()))  # what a checkpoint's client_state holds
    new = loaders(45, resumed[1], micro_batch_size=resumed[0], **kwargs)
    for loader in new:
        loader.load_state_dict(state)
    assert all(loader.position == stop for loader in new)  # still counts global steps
    after = [global_step(new) for _ in range(12)]
    orders = epoch_orders(45, 8, **kwargs)
    epoch, offset = state["epoch"], state["epoch_offset"]
    batch = resumed[0] * resumed[1]
    assert after == expected_after_resume(orders, epoch, offset, batch, 12, drop_last)
    # The interrupted epoch, read by the saved run and then the resumed one, is its order: no
    # sample twice, none skipped but (drop_last) a tail smaller than one new global batch.
    in_epoch = (45 - offset) // batch if drop_last else math.ceil((45 - offset) / batch)
    joined = [i for b in consumed for i in b][len(consumed) * saved[0] * saved[1] - offset :]
    joined += [i for b in after[:in_epoch] for i in b]
    if drop_last:
        assert joined == orders[epoch][: len(joined)] and 45 - len(joined) < batch
    else:  # the last batch wraps around to the start of the same epoch's order
        assert joined[:45] == orders[epoch] and joined[45:] == orders[epoch][: len(joined) - 45]


def test_a_resumed_loader_saves_and_resumes_again_exactly() -> None:
    first = loaders(50, 2, micro_batch_size=3, seed=2)  # global batch 6
    for _ in range(4):
        global_step(first)
    second = loaders(50, 4, micro_batch_size=2, seed=2)  # global batch 8, from sample 24
    for loader in second:
        loader.load_state_dict(first[0].state_dict())
    for _ in range(2):
        global_step(second)
    state = second[0].state_dict()
    assert (state["position"], state["epoch"], state["epoch_offset"]) == (6, 0, 40)
    reference = [global_step(second) for _ in range(8)]
    for world, micro in ((4, 2), (1, 8)):  # same global batch, any split
        third = loaders(50, world, micro_batch_size=micro, seed=2)
        for loader in third:
            loader.load_state_dict(state)
        assert [global_step(third) for _ in range(8)] == reference
    with pytest.raises(ValueError, match="position 5 precedes the resumed step 6"):
        third[0].global_indices(5)


def test_a_state_saved_before_epoch_offset_existed_still_resumes() -> None:
    run = loaders(40, 2, micro_batch_size=3, seed=8)  # global batch 6, 6 steps per epoch
    for _ in range(8):
        global_step(run)
    state = run[0].state_dict()
    old = {k: v for k, v in state.items() if k != "epoch_offset"}
    resumed = loaders(40, 3, micro_batch_size=3, seed=8)
    for loader in resumed:
        loader.load_state_dict(old)
    assert resumed[0].epoch_offset == state["epoch_offset"] == 12
    reference = loaders(40, 3, micro_batch_size=3, seed=8)
    for loader in reference:
        loader.load_state_dict(state)
    assert [global_step(resumed) for _ in range(5)] == [global_step(reference) for _ in range(5)]


def test_iteration_after_a_resume_finishes_the_epoch_in_the_new_geometry() -> None:
    saved = DistributedBatchLoader(Indexed(20), micro_batch_size=3, shuffle=False)
    saved.next_batch()  # samples 0-2
    loader = DistributedBatchLoader(Indexed(20), micro_batch_size=4, shuffle=False)
    loader.load_state_dict(saved.state_dict())
    assert [b.tolist() for b in loader] == [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14],
                                            [15, 16, 17, 18]]  # sample 19 is the dropped tail
    assert loader.epoch == 1 and loader.position == 5
    assert [b.tolist() for b in loader][:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert loader.position == 10  # 5 whole batches of the next epoch
    loader.position = 0  # setting the position starts afresh in this geometry
    assert loader.global_indices() == [0, 1, 2, 3] and loader.steps_left_in_epoch == 5


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
    with pytest.raises(ValueError, match="saved with num_samples=10 but this loader has "
                                         "num_samples=12"):
        DistributedBatchLoader(Indexed(12), micro_batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with shuffle=True but this loader has "
                                         "shuffle=False"):
        DistributedBatchLoader(Indexed(10), micro_batch_size=2, seed=1,
                               shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with drop_last=True but this loader has "
                                         "drop_last=False"):
        DistributedBatchLoader(Indexed(10), micro_batch_size=2, seed=1,
                               drop_last=False).load_state_dict(state)
    loader = DistributedBatchLoader(Indexed(10), micro_batch_size=2, seed=1)
    with pytest.raises(ValueError, match="the state has no 'position'"):
        loader.load_state_dict({"epoch": 0, "epoch_offset": 0})
    with pytest.raises(ValueError, match="epoch_offset 10 .* outside the dataset's 10 samples"):
        loader.load_state_dict({**state, "epoch_offset": 10})
    with pytest.raises(ValueError, match="position must be an integer >= 0, got -1"):
        loader.load_state_dict({**state, "position": -1})
    assert loader.position == 0  # a rejected state changes nothing


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


# --- the documented resume recipe, end to end, at a new world size ------------------------------


class Numbered:
    """Sample i is (x = [i, i, i, i], y = [i % 3]): a batch shows which samples it holds."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((4,), float(i)), torch.tensor([float(i % 3)])


# A fixed per-rank config: the global batch is 4 samples per rank (4 at world 1, 8 at world 2).
RECIPE_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
    "funczero": {"seed": 7},
}


def _regression_loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _initialize() -> funczero.Initialized:
    torch.manual_seed(0)
    return funczero.initialize(
        torch.nn.Linear(4, 1), RECIPE_CONFIG, _regression_loss, training_data=Numbered()
    )


def _resume_with_the_documented_recipe(rank: int, world_size: int, ckpt: str, out: str) -> None:
    run = _initialize()
    state, client = checkpoint.load(ckpt, like=run.state)
    run.loader.load_state_dict(client["loader"])  # getting-started.md, migrating, the example
    seen = []
    for _ in range(3):
        batch = run.loader.next_batch()
        seen.append(batch[0][:, 0].long().tolist())
        state, _ = run.train_step(state, batch)
    result = {"seen": seen, "step": int(state.step), "position": run.loader.position}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_documented_resume_recipe_works_at_a_new_world_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)  # this process is a world of 1
    run = _initialize()
    state = run.state
    for _ in range(3):
        state, _ = run.train_step(state, run.loader.next_batch())  # samples 0-11 of epoch 0
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save(ckpt, state, client_state={"loader": run.loader.state_dict()})
    order = run.loader.global_indices(0) + [
        i for p in range(1, 10) for i in run.loader.global_indices(p)
    ]  # epoch 0's order, 4 samples at a time

    run_distributed(_resume_with_the_documented_recipe, 2, ckpt, str(tmp_path), timeout=180.0)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["step"] == 6 and r["position"] == 6 for r in ranks)  # steps 3..5 done
    global_batches = [ranks[0]["seen"][k] + ranks[1]["seen"][k] for k in range(3)]
    assert global_batches == [order[12:20], order[20:28], order[28:36]]
