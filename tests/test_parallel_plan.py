"""build_plan: frozen data, units per block, root parts, persistence, tied weights, bad input."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from funczero import optim
from funczero.models.gpt import GPT, cross_entropy_loss
from funczero.module import extract_tensors, release_module_tensors
from funczero.parallel.forward_backward import PrefetchOrder, forward_backward
from funczero.parallel.plan import ZeroPlan, build_plan, default_wrap_policy
from funczero.parallel.stages import STAGES
from funczero.train.state import init_state
from funczero.train.step import make_train_step

BLOCKS = ["blocks.0", "blocks.1"]


def test_plan_is_frozen(tiny_model: Callable[..., GPT]) -> None:
    plan = build_plan(tiny_model(), stage=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.units = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.prefetch_order = PrefetchOrder()  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.blocks[0].wait_now = True  # type: ignore[misc]


def _snapshot(plan: ZeroPlan) -> dict[str, Any]:
    """Identity of every field, contents of the mutable ones, and the module's attributes."""
    modules = dict(plan.module.named_modules())
    return {
        "fields": {k: id(v) for k, v in vars(plan).items()},
        "specs": dict(plan.shard_specs),
        "slots": {k: tuple((id(m), a, n) for m, a, n in v) for k, v in plan.slots.items()},
        "module_attrs": {name: sorted(vars(m)) for name, m in modules.items()},
        "module_params": {
            name: {k: id(p) for k, p in m._parameters.items()} for name, m in modules.items()
        },
    }


@pytest.mark.parametrize("stage", [3, 2])
def test_train_steps_leave_the_plan_and_its_module_unchanged(
    tiny_model: Callable[..., GPT], tiny_batch: Callable[..., Any], stage: int
) -> None:
    model = tiny_model()
    plan = build_plan(model, stage=stage, param_persistence_threshold=10)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.adamw(1e-2)
    state = init_state(plan, opt, params, buffers)
    before = _snapshot(plan)
    step = make_train_step(cross_entropy_loss, opt, plan)
    for seed in (1, 2):
        state, metrics = step(state, tiny_batch(seed))
        assert torch.isfinite(metrics["loss"])
    assert _snapshot(plan) == before
    assert not any(isinstance(v, PrefetchOrder) for v in vars(plan).values())
    # A second step function on the same plan starts from its own prefetch order.
    other = make_train_step(cross_entropy_loss, opt, plan)
    state, _ = other(state, tiny_batch(3))
    assert _snapshot(plan) == before


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_build_plan_makes_one_unit_per_transformer_block(
    tiny_model: Callable[..., GPT], stage: int
) -> None:
    model = tiny_model()
    model.wpe.weight.requires_grad_(False)
    plan = build_plan(model, stage=stage)
    assert default_wrap_policy(model) == BLOCKS
    assert [u.name for u in plan.units] == ["", *BLOCKS]
    assert plan.policy is STAGES[stage] and plan.stage == stage
    for unit in plan.units[1:]:
        expected = tuple(n for n in plan.spec.params if n.startswith(unit.name + "."))
        assert unit.params == expected
        assert unit.specs == tuple(plan.shard_specs[n] for n in expected)
    every = [n for u in plan.units for n in u.params]
    assert sorted(every) == sorted(plan.spec.params), "each parameter in exactly one unit"
    assert [su.unit for su in plan.blocks] == list(plan.units[1:])
    for su in plan.blocks:
        assert su.replicated is (stage < 3)
        assert su.reduction == ("all_reduce" if stage == 0 else "reduce_scatter")
        assert not su.keep_gathered and not su.wait_now
        assert su.trainable == su.unit.params
    # Gradient units: the trainable parameters only (wpe is frozen).
    assert [gu.params for gu in plan.grad_units] == [
        tuple(n for n in u.params if n != "wpe.weight") for u in plan.units
    ]
    assert plan.slots.keys() == (set(BLOCKS) if stage == 3 else set())


def test_build_plan_follows_a_wrap_list_or_policy(tiny_model: Callable[..., GPT]) -> None:
    model = tiny_model()
    assert [u.name for u in build_plan(model, wrap=["blocks.1"]).units] == ["", "blocks.1"]
    assert [u.name for u in build_plan(model, wrap=lambda m: ["blocks.0"]).units] == [
        "",
        "blocks.0",
    ]
    nested = [u.name for u in build_plan(model, stage=3, wrap=["blocks.0", "blocks.0.fc"]).units]
    assert nested == ["", "blocks.0", "blocks.0.fc"], "a parameter belongs to its innermost unit"


def test_root_parts_are_the_roots_top_level_submodules_kept_gathered(
    tiny_model: Callable[..., GPT],
) -> None:
    for stage in (0, 3):
        plan = build_plan(tiny_model(), stage=stage)
        # head.weight is tied to wte.weight: it has no part of its own.
        assert [su.unit.params for su in plan.root_parts] == [
            ("wte.weight",),
            ("wpe.weight",),
            ("ln_f.weight", "ln_f.bias"),
        ]
        assert all(su.keep_gathered and su.unit.name == "" for su in plan.root_parts)
        assert all(su.replicated is (stage < 3) for su in plan.root_parts)


class Flat(nn.Module):
    """A model without blocks: ``n`` top-level Linears and a parameter of the root itself."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        for i in range(n):
            self.add_module(f"l{i}", nn.Linear(2, 2))


def test_root_stays_whole_with_more_than_eight_top_level_groups() -> None:
    eight = build_plan(Flat(7), stage=3)  # 7 Linears and the root's own parameter: 8 groups
    assert [su.unit.params for su in eight.root_parts][:2] == [("scale",), ("l0.weight", "l0.bias")]
    assert len(eight.root_parts) == 8
    nine = build_plan(Flat(8), stage=3)
    assert len(nine.root_parts) == 1
    assert nine.root_parts[0].unit == nine.units[0]


def test_stage3_keeps_parameters_below_the_persistence_threshold_replicated(
    tiny_model: Callable[..., GPT],
) -> None:
    model = tiny_model()
    model.ln_f.bias.requires_grad_(False)
    plan = build_plan(model, stage=3, param_persistence_threshold=10)
    small = tuple(n for n in plan.spec.params if plan.spec.shapes[n].numel() < 10)
    assert small and plan.persistent is not None
    assert plan.persistent.params == small
    for n in plan.spec.params:
        assert plan.is_sharded(n) is (n not in small), n
    assert not set(small) & {p for u in plan.units for p in u.params}
    (su,) = plan.persistent_units
    assert su.unit is plan.persistent and su.replicated and not su.keep_gathered
    assert plan.persistent_grad_unit is not None
    assert plan.persistent_grad_unit.params == tuple(n for n in small if n != "ln_f.bias")
    # The threshold is a stage-3 setting; 0 keeps nothing replicated.
    for stage, threshold in ((2, 10), (3, 0)):
        other = build_plan(tiny_model(), stage=stage, param_persistence_threshold=threshold)
        assert other.persistent is None and other.persistent_units == ()
        assert other.persistent_grad_unit is None
        assert all(other.is_sharded(n) is (stage == 3) for n in other.spec.params)


def test_persistent_grad_unit_is_none_when_every_persistent_parameter_is_frozen(
    tiny_model: Callable[..., GPT],
) -> None:
    model = tiny_model()
    for n, p in model.named_parameters():
        if p.numel() < 10:
            p.requires_grad_(False)
    plan = build_plan(model, stage=3, param_persistence_threshold=10)
    assert plan.persistent is not None and plan.persistent_grad_unit is None


class TiedBlocks(nn.Module):
    """Three blocks; the first two share one weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
        self.blocks[1].weight = self.blocks[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def test_a_weight_tied_across_stage3_units_makes_both_wait_for_their_reduction() -> None:
    plan = build_plan(TiedBlocks(), stage=3)
    units = {su.unit.name: su for su in plan.blocks}
    assert "blocks.0.weight" in units["blocks.0"].unit.params
    assert "blocks.0.weight" in units["blocks.1"].unit.params
    assert [units[u].wait_now for u in ("blocks.0", "blocks.1", "blocks.2")] == [True, True, False]
    tied_slot = [(m, a) for m, a, n in plan.slots["blocks.1"] if n == "blocks.0.weight"]
    assert tied_slot == [(plan.module.blocks[1], "weight")]
    # Replicated stages materialise the tied weight once, in its owner's unit: nothing waits.
    replicated = build_plan(TiedBlocks(), stage=2)
    assert not any(su.wait_now for su in replicated.blocks)
    assert "blocks.0.weight" not in replicated.units[2].params


def test_a_weight_tied_across_stage3_units_gets_the_sum_of_both_uses_gradients() -> None:
    model = TiedBlocks()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    plan = build_plan(model, stage=3)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    shards = {n: plan.shard_specs[n].shard(p, 0) for n, p in params.items()}
    out = forward_backward(
        plan, lambda m, b: m(b).square().sum(), shards, shards, buffers, x, torch.tensor(1.0),
        single_micro_batch=True, order=PrefetchOrder(),
    )  # fmt: skip
    assert out.reduced
    for n in plan.trainable:
        torch.testing.assert_close(out.grads[n], expected[n].reshape(-1), rtol=1e-5, atol=1e-6)


def test_build_plan_rejects_bad_settings_naming_the_value(tiny_model: Callable[..., GPT]) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"stage=4 must be 0, 1, 2 or 3"):
        build_plan(model, stage=4)
    with pytest.raises(ValueError, match=r"stage='3' must be 0, 1, 2 or 3"):
        build_plan(model, stage="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"wrap: 'blocks\.7' is not a submodule"):
        build_plan(model, wrap=["blocks.7"])
    with pytest.raises(ValueError, match=r"wrap: 'nope' is not a submodule"):
        build_plan(model, stage=3, wrap=lambda m: ["nope"])
    with pytest.raises(ValueError, match=r"buffer_sync='sum' must be 'mean' or 'none'"):
        build_plan(model, buffer_sync="sum")
    with pytest.raises(ValueError, match=r"precision 'fp8'"):
        build_plan(model, precision="fp8")
    with pytest.raises(
        RuntimeError, match=r"world_size=2 but torch.distributed is not initialised"
    ):
        build_plan(model, world_size=2)


def _run_one_step(model: GPT, plan: ZeroPlan, batch: Any) -> torch.Tensor:
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.sgd(0.1)
    state = init_state(plan, opt, params, buffers)
    _, metrics = make_train_step(cross_entropy_loss, opt, plan)(state, batch)
    return metrics["loss"]


@pytest.mark.parametrize("stage", [1, 3])
def test_a_module_named_twice_in_wrap_is_rejected_or_planned_once(
    tiny_model: Callable[..., GPT], tiny_batch: Callable[..., Any], stage: int
) -> None:
    model = tiny_model()
    try:
        plan = build_plan(model, stage=stage, wrap=["blocks.0", "blocks.0", "blocks.1"])
    except ValueError as e:
        assert "blocks.0" in str(e)
        return
    assert [u.name for u in plan.units] == ["", *BLOCKS]
    assert torch.isfinite(_run_one_step(model, plan, tiny_batch()))


@pytest.mark.parametrize("stage", [1, 3])
def test_the_root_in_wrap_is_rejected_or_planned_once(
    tiny_model: Callable[..., GPT], tiny_batch: Callable[..., Any], stage: int
) -> None:
    model = tiny_model()
    try:
        plan = build_plan(model, stage=stage, wrap=["", *BLOCKS])
    except ValueError as e:
        assert "wrap" in str(e)
        return
    assert [u.name for u in plan.units] == ["", *BLOCKS]
    assert torch.isfinite(_run_one_step(model, plan, tiny_batch()))



@pytest.mark.parametrize(("stage", "hybrid", "copies"), [(0, False, 4), (1, False, 1), (3, False, 1), (2, True, 2), (3, True, 2)])
def test_gradient_copies_and_data_parallel_ranks_follow_the_layout(
    stage: int, hybrid: bool, copies: int
) -> None:
    # The step divides the norm's sum of squares by how many ranks hold each reduced gradient
    # element: every rank at stage 0, the shard's owner from stage 1 on, times the replicas.
    from funczero.parallel.hybrid import HybridLayout

    plan = build_plan(nn.Linear(2, 2), stage=stage)
    layout = HybridLayout(shard_size=2, replicate_size=2, shard_rank=1, replicate_rank=1)
    if hybrid:
        plan = dataclasses.replace(plan, world_size=2, rank=1, hybrid=layout)
    else:
        plan = dataclasses.replace(plan, world_size=4, rank=3)
    assert plan.grad_copies == copies
    assert (plan.data_parallel_size, plan.data_parallel_rank) == (4, 3)
