"""TensorEntry: the one leaf descriptor, built from the state's recorded layout when saving and
from index.json when reading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from funczero import checkpoint, tree
from funczero.checkpoint.entry import TensorEntry, state_entries
from funczero.parallel.sharding import ShardSpec
from funczero.testing.states import toy_state
from funczero.train.state import LeafLayout


def test_entries_follow_the_tree_paths_and_the_recorded_layouts() -> None:
    state = toy_state(world_size=2, rank=1, stage=3, persistent=["b"])
    entries = state_entries(state)
    assert [e.path for e, _ in entries] == [p for p, _ in tree.leaves_with_path(state)]
    recorded = state.layout.leaf_map()
    for entry, leaf in entries:
        assert entry.layout == recorded[entry.path] and entry.dtype == leaf.dtype
    by_path = {e.path: e for e, _ in entries}
    assert (
        by_path["params/w"].placement == "shard" and by_path["params/b"].placement == "replicated"
    )
    assert "opt_state/0/mu/w" in by_path and "opt_state/0/count" in by_path  # fields by name


def test_save_writes_the_recorded_layout_it_never_guesses_one(tmp_path: Path) -> None:
    state = toy_state()
    # A layout that the path and shape alone would not give (a moment kept per rank, as a
    # factored one is): the checkpoint must say what the state recorded.
    leaves = tuple(
        (p, LeafLayout("moment", "per_rank", None, lay.shape) if p == "opt_state/0/nu/w" else lay)
        for p, lay in state.layout.leaves
    )
    state = state.replace(layout=dataclasses.replace(state.layout, leaves=leaves))
    path = checkpoint.save(tmp_path, state)
    saved = checkpoint.read_index(path).tensors
    assert saved["opt_state/0/nu/w"].placement == "per_rank"
    assert saved["opt_state/0/mu/w"].placement == "replicated"
    got, _ = checkpoint.load(tmp_path, like=state)
    assert torch.equal(got.opt_state[0].nu["w"], state.opt_state[0].nu["w"])


def test_entries_read_back_equal_the_entries_saved(tmp_path: Path) -> None:
    state = toy_state(stage=2)
    index = checkpoint.read_index(checkpoint.save(tmp_path, state))
    for entry, _ in state_entries(state):
        read = index.tensors[entry.path]
        assert isinstance(read, TensorEntry)
        assert (read.layout, read.dtype) == (entry.layout, entry.dtype), entry.path


def test_a_leaf_without_a_recorded_layout_is_refused_by_path() -> None:
    state = toy_state()
    leaves = tuple((p, lay) for p, lay in state.layout.leaves if p != "buffers/num_batches")
    state = state.replace(layout=dataclasses.replace(state.layout, leaves=leaves))
    with pytest.raises(KeyError, match="'buffers/num_batches' has no recorded layout"):
        state_entries(state)


@pytest.mark.parametrize("numel, world", [(10, 4), (7, 7), (3, 8), (0, 3), (16, 1)])
def test_stored_ranges_are_the_shard_spec_bounds_without_empty_chunks(
    numel: int, world: int
) -> None:
    entry = TensorEntry("master/x", LeafLayout("master", "shard", "x", (numel,)), torch.float32)
    spec = ShardSpec("x", torch.Size([numel]), world)
    want = [(r, *spec.bounds(r)) for r in range(world) if spec.bounds(r)[0] < spec.bounds(r)[1]]
    assert entry.stored_ranges(world) == want
    rng = TensorEntry("rng", LeafLayout("rng", "per_rank", None, (5,)), torch.uint8)
    assert rng.stored_ranges(world) == [(r, 0, 5) for r in range(world)]


def test_stored_ranges_of_a_small_tensor_at_a_huge_world_size_cost_nothing() -> None:
    entry = TensorEntry("step", LeafLayout("scalar", "replicated", None, ()), torch.int64)
    assert entry.stored_ranges(99_999) == [(0, 0, 1)]
