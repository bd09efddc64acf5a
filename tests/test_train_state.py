"""TrainState.create and init_state record every leaf's layout by the stage's rules."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from funczero import optim, tree
from funczero.models.gpt import GPT
from funczero.module import extract_tensors
from funczero.parallel.plan import build_plan
from funczero.parallel.sharding import ShardSpec
from funczero.train.state import DonatedStateError, LeafLayout, TrainState, init_state

FIELDS = ("step", "params", "master", "opt_state", "loss_scale", "buffers", "rng", "skipped")
TOY_SHAPES = {"emb": (5, 3), "w": (4, 4), "b": (7,), "frozen": (3,)}


def fields_of(state: TrainState) -> dict[str, Any]:
    return {f: getattr(state, f) for f in FIELDS}


def check_layouts(state: TrainState, *, persistent: set[str]) -> None:
    """Every leaf has a layout, and it follows the rules of the state's stage."""
    lay = state.layout
    stage, world = lay.stage, lay.world_size
    shapes = dict(lay.shapes)
    leaves = dict(tree.leaves_with_path(fields_of(state)))
    recorded = lay.leaf_map()
    assert set(recorded) == set(leaves) and len(lay.leaves) == len(leaves)
    sharded_params = set()
    for path, tensor in leaves.items():
        layout = lay.leaf(path)
        head, last = path.split("/", 1)[0], path.rsplit("/", 1)[-1]
        if head == "params":
            shard = stage == 3 and last not in persistent
            expected = ("param", "shard" if shard else "replicated")
            sharded_params |= {last} if shard else set()
        elif head == "master":
            assert last in lay.trainable, path
            expected = ("master", "shard" if stage >= 1 else "replicated")
        elif head == "opt_state" and last in lay.trainable:
            expected = ("moment", "shard" if stage >= 1 else "replicated")
        elif head == "opt_state":
            expected = ("optim", "replicated")  # a step count, a schedule's state
        elif head == "buffers":
            expected = ("buffer", "replicated")
        elif head == "rng":
            expected = ("rng", "per_rank")
        else:
            expected = ("scalar", "replicated")
        assert (layout.kind, layout.placement) == expected, (path, layout)
        assert layout.group == (
            "model" if layout.kind in ("param", "master", "buffer") else "optim"
        )
        if layout.placement == "shard":
            spec = ShardSpec(last, torch.Size(shapes[last]), world)
            assert layout.param == last and layout.shape == shapes[last], path
            assert tensor.shape == (spec.shard_numel,), path
            assert layout.numel == math.prod(shapes[last])
        else:
            assert layout.param is None and layout.shape == tuple(tensor.shape), path
    assert lay.sharded_params == sharded_params


def gpt_state(model: GPT, stage: int, threshold: int) -> tuple[TrainState, set[str]]:
    model.wpe.weight.requires_grad_(False)  # a frozen parameter
    plan = build_plan(model, stage=stage, param_persistence_threshold=threshold)
    params, buffers = extract_tensors(model, plan.spec)
    assert buffers, "the tiny GPT with batch_norm has buffers"
    state = init_state(plan, optim.adamw(1e-3), params, buffers, seed=3)
    persistent = set(plan.persistent.params) if plan.persistent is not None else set()
    return state, persistent


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_init_state_records_every_leafs_layout_by_the_stage_rules(
    tiny_model: Callable[..., GPT], stage: int
) -> None:
    state, persistent = gpt_state(tiny_model(batch_norm=True), stage, threshold=10)
    assert (persistent != set()) is (stage == 3)
    check_layouts(state, persistent=persistent)
    assert state.layout.stage == stage and state.layout.world_size == 1 and state.layout.rank == 0
    assert "wpe.weight" not in state.layout.trainable
    assert ("head.weight", "wte.weight") in state.layout.aliases


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize(("world", "rank"), [(2, 1), (3, 2), (4, 0)])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_create_records_every_leafs_layout_for_any_world_and_rank(
    toy_state: Callable[..., TrainState], stage: int, world: int, rank: int, optimizer: str
) -> None:
    state = toy_state(
        world_size=world, rank=rank, stage=stage, persistent=("b",), optimizer=optimizer
    )
    check_layouts(state, persistent={"b"})
    # The frozen parameter is sharded at stage 3 like any other (it has no master weights).
    assert state.layout.leaf("params/frozen").placement == ("shard" if stage == 3 else "replicated")
    with pytest.raises(KeyError):
        state.layout.leaf("master/frozen")


def test_leaf_names_the_unknown_path_and_how_to_build_states() -> None:
    from funczero.testing.states import toy_state

    layout = toy_state().layout
    with pytest.raises(
        KeyError, match=r"state leaf 'params/nope' has no recorded layout.*init_state"
    ):
        layout.leaf("params/nope")
    assert layout.leaf("params/w") == LeafLayout("param", "replicated", None, (4, 4))


def minimal_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "step": torch.zeros((), dtype=torch.int64),
        "params": {"w": torch.zeros(4, 4)},
        "master": {"w": torch.zeros(8)},
        "opt_state": {"mu": {"w": torch.zeros(8)}, "count": torch.zeros((), dtype=torch.int64)},
        "loss_scale": (torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)),
        "buffers": {},
        "rng": torch.zeros(16, dtype=torch.uint8),
        "skipped": torch.zeros((), dtype=torch.int64),
    }
    fields.update(overrides)
    return fields


def create(stage: int = 1, **fields: Any) -> TrainState:
    return TrainState.create(
        stage=stage, world_size=2, rank=1, precision="fp32", shapes={"w": (4, 4)},
        trainable=("w",), sharded_params=(), aliases=(("v", "w"),), **minimal_fields(**fields),
    )  # fmt: skip


def test_create_keeps_the_fields_and_describes_the_layout() -> None:
    state = create()
    lay = state.layout
    assert (lay.stage, lay.world_size, lay.rank, lay.precision) == (1, 2, 1, "fp32")
    assert (
        lay.shapes == (("w", (4, 4)),) and lay.trainable == ("w",) and lay.aliases == (("v", "w"),)
    )
    assert state.master["w"].shape == (8,)
    assert lay.leaf("master/w") == LeafLayout("master", "shard", "w", (4, 4))
    assert lay.leaf("opt_state/mu/w") == LeafLayout("moment", "shard", "w", (4, 4))
    assert lay.leaf("opt_state/count") == LeafLayout("optim", "replicated", None, ())
    assert lay.leaf("rng") == LeafLayout("rng", "per_rank", None, (16,))
    assert lay.leaf_map() is not lay.leaf_map(), "a new dict each call"


def test_create_keeps_a_moment_of_another_shape_per_rank_under_zero() -> None:
    # A factored second moment (a row of the parameter) is neither the parameter nor its shard.
    factored = {"mu": {"w": torch.zeros(8)}, "row": {"w": torch.zeros(4)}}
    sharded = create(stage=1, opt_state=factored)
    assert sharded.layout.leaf("opt_state/row/w") == LeafLayout("moment", "per_rank", None, (4,))
    full = create(
        stage=0, master={"w": torch.zeros(4, 4)}, opt_state={"row": {"w": torch.zeros(4)}}
    )
    assert full.layout.leaf("opt_state/row/w") == LeafLayout("optim", "replicated", None, (4,))


def test_create_rejects_a_leaf_that_is_not_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"state leaf 'opt_state/count' is a int, not a tensor"):
        create(opt_state={"count": 3})


def test_a_donated_state_refuses_to_be_read() -> None:
    state = create()
    assert not state.donated
    state.mark_donated()
    assert state.donated
    with pytest.raises(DonatedStateError, match=r"reading state\.params is an error"):
        state.params  # noqa: B018
