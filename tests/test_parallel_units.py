"""The unit boundary (materialize_unit) against plain autograd, at world 1 and on 2 gloo ranks."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Hashable
from typing import Any

import pytest
import torch

from funczero.parallel.overlap import Prefetcher, ReduceQueue, Regather
from funczero.parallel.sharding import ShardSpec, Unit
from funczero.parallel.units import StepContext, StepUnit, materialize_unit, swap_parameters

SHAPES = {"w": (2, 3), "b": (2,), "f": (3,)}  # f is frozen
TRAINABLE = ("w", "b")
WORLD = 2


def make_unit(world: int) -> Unit:
    return Unit(
        "blk", tuple(SHAPES), tuple(ShardSpec(n, torch.Size(s), world) for n, s in SHAPES.items())
    )


def full_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def batch_of(rank: int) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(100 + rank))


def loss_of(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = (x + p["f"]) @ p["w"].t() + p["b"]
    return (out**2).sum() + (p["w"] * p["b"][:, None]).sum()


def reference_grads(rank: int) -> dict[str, torch.Tensor]:
    """Plain autograd on full fp32 parameters: this rank's local gradients."""
    p = full_params()
    leaves = {n: p[n].clone().requires_grad_(n in TRAINABLE) for n in SHAPES}
    loss_of(leaves, batch_of(rank)).backward()
    return {n: leaves[n].grad for n in TRAINABLE}  # type: ignore[misc]


def step_unit(world: int, rank: int, *, replicated: bool, reduction: str, **facts: Any) -> StepUnit:
    return StepUnit.of(
        make_unit(world), TRAINABLE, replicated=replicated, reduction=reduction,
        compute_dtype=torch.float32, reduce_dtype=torch.float32, group=None, rank=rank, **facts,
    )  # fmt: skip


def state_params(world: int, rank: int, *, replicated: bool) -> dict[str, torch.Tensor]:
    full = full_params()
    if replicated:
        return full
    return {n: ShardSpec(n, torch.Size(s), world).shard(full[n], rank) for n, s in SHAPES.items()}


def anchors_for(su: StepUnit) -> dict[str, torch.Tensor]:
    """fp32 anchors in the layout gradients are reduced into (values are not read)."""
    spec = {s.name: s for s in su.unit.specs}
    if su.reduction == "all_reduce":
        return {n: torch.zeros(spec[n].shape, requires_grad=True) for n in su.trainable}
    return {n: torch.zeros(spec[n].shard_numel, requires_grad=True) for n in su.trainable}


def boundary_grads(
    world: int, rank: int, *, replicated: bool, reduction: str, queue: bool = False, **facts: Any
) -> dict[str, torch.Tensor]:
    su = step_unit(world, rank, replicated=replicated, reduction=reduction, **facts)
    ctx = StepContext(
        params=state_params(world, rank, replicated=replicated),
        queue=ReduceQueue() if queue else None,
    )
    anchors = anchors_for(su)
    full = materialize_unit(su, ctx, anchors)
    loss_of(full, batch_of(rank)).backward()
    if ctx.queue is not None:
        ctx.queue.drain()
    return {n: a.grad for n, a in anchors.items()}  # type: ignore[misc]


# (replicated, reduction, extra StepUnit facts) of each kind of boundary the step builds.
CASES = {
    "stage0": (True, "all_reduce", {}),
    "stage2": (True, "reduce_scatter", {}),
    "stage3": (False, "reduce_scatter", {}),
    "stage3-all-reduce": (False, "reduce_scatter", {"use_all_reduce": True}),
}


def expected_grads(case: str, world: int, rank: int) -> dict[str, torch.Tensor]:
    """The reference: mean over ranks of plain autograd's gradients, sliced to the anchor layout."""
    per_rank = [reference_grads(r) for r in range(world)]
    mean = {n: sum(g[n].double() for g in per_rank) / world for n in TRAINABLE}
    _, reduction, _ = CASES[case]
    if reduction == "all_reduce":
        return {n: m.float() for n, m in mean.items()}
    return {
        n: ShardSpec(n, torch.Size(SHAPES[n]), world).shard(mean[n], rank).float()
        for n in TRAINABLE
    }


@pytest.mark.parametrize("queue", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_materialize_unit_gives_anchor_gradients_equal_to_autograd_at_world_one(
    case: str, queue: bool
) -> None:
    replicated, reduction, facts = CASES[case]
    grads = boundary_grads(1, 0, replicated=replicated, reduction=reduction, queue=queue, **facts)
    expected = expected_grads(case, 1, 0)
    for n in TRAINABLE:
        torch.testing.assert_close(grads[n], expected[n], rtol=1e-6, atol=1e-6)


def test_materialize_unit_passes_replicated_parameters_through_without_history() -> None:
    su = step_unit(1, 0, replicated=True, reduction="all_reduce")
    params = full_params()
    ctx = StepContext(params=params)
    full = materialize_unit(su, ctx, anchors_for(su))
    for n in SHAPES:
        torch.testing.assert_close(full[n], params[n], rtol=0, atol=0)
        assert full[n].untyped_storage().data_ptr() == params[n].untyped_storage().data_ptr()
        assert not params[n].requires_grad and params[n].grad_fn is None
    assert full["w"].requires_grad and full["b"].requires_grad


def test_materialize_unit_gathers_a_sharded_unit_into_one_buffer() -> None:
    su = step_unit(1, 0, replicated=False, reduction="reduce_scatter")
    ctx = StepContext(params=state_params(1, 0, replicated=False))
    full = materialize_unit(su, ctx, anchors_for(su))
    for n, v in full_params().items():
        torch.testing.assert_close(full[n], v, rtol=0, atol=0)
    assert len({t.untyped_storage().data_ptr() for t in full.values()}) == 1


@pytest.mark.parametrize("replicated", [True, False])
def test_materialize_unit_gives_frozen_parameters_no_gradient(replicated: bool) -> None:
    su = step_unit(1, 0, replicated=replicated, reduction="reduce_scatter")
    assert su.trainable == TRAINABLE and su.grad_unit.params == TRAINABLE
    anchors = anchors_for(su)
    frozen_anchor = torch.zeros(3, requires_grad=True)  # ignored: f is not trainable
    ctx = StepContext(params=state_params(1, 0, replicated=replicated))
    full = materialize_unit(su, ctx, {**anchors, "f": frozen_anchor})
    assert not full["f"].requires_grad
    loss_of(full, batch_of(0)).backward()
    assert frozen_anchor.grad is None
    assert all(a.grad is not None for a in anchors.values())


def test_materialize_unit_gives_zero_gradients_to_parameters_the_loss_does_not_use() -> None:
    su = step_unit(1, 0, replicated=False, reduction="reduce_scatter")
    anchors = anchors_for(su)
    full = materialize_unit(su, StepContext(params=state_params(1, 0, replicated=False)), anchors)
    (full["w"] ** 2).sum().backward()
    torch.testing.assert_close(anchors["b"].grad, torch.zeros(2))
    torch.testing.assert_close(anchors["w"].grad, (2 * full_params()["w"]).reshape(-1))


def test_boundary_regathers_in_backward_and_releases_the_copy_after_reducing() -> None:
    su = step_unit(1, 0, replicated=False, reduction="reduce_scatter")
    ctx = StepContext(params=state_params(1, 0, replicated=False), queue=ReduceQueue())
    gathered: list[weakref.ref[torch.Tensor]] = []

    def counting_gather(key: Hashable) -> dict[str, torch.Tensor]:
        full = ctx.gather(key)  # type: ignore[arg-type]
        gathered.append(weakref.ref(next(iter(full.values()))))
        return full

    ctx.regather = Regather(counting_gather)
    ctx.prefetch = Prefetcher([su], ctx.gather_async)
    ctx.prefetch.start(roots=())
    anchors = anchors_for(su)
    with ctx.regather.hooks():
        full = materialize_unit(su, ctx, anchors)
        loss = loss_of(full, batch_of(0))
    ctx.regather.unregister(full)
    del full
    ctx.prefetch.end_forward()
    assert gathered == [], "forward used the prefetched gather"
    loss.backward()
    ctx.queue.drain()  # type: ignore[union-attr]
    assert len(gathered) == 1, "backward gathered the unit again, once"
    gc.collect()
    assert gathered[0]() is None, "the boundary's backward released the re-gathered copy"
    expected = expected_grads("stage3", 1, 0)
    for n in TRAINABLE:
        torch.testing.assert_close(anchors[n].grad, expected[n], rtol=1e-6, atol=1e-6)


def test_swap_parameters_points_module_attributes_at_tensors_and_restores_them() -> None:
    lin = torch.nn.Linear(3, 2)
    old_w, old_b = lin.weight, lin.bias
    new = full_params()
    with swap_parameters(((lin, "weight", "w"), (lin, "bias", "b")), new):
        assert lin.weight is new["w"] and lin.bias is new["b"]
    assert lin.weight is old_w and lin.bias is old_b
    with pytest.raises(RuntimeError, match="boom"), swap_parameters(((lin, "weight", "w"),), new):
        raise RuntimeError("boom")
    assert lin.weight is old_w, "restored on error too"


def _units_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for case, (replicated, reduction, facts) in CASES.items():
        for queue in (False, True):
            grads = boundary_grads(
                world, rank, replicated=replicated, reduction=reduction, queue=queue, **facts
            )
            for n, g in grads.items():
                out[f"{case}/{queue}/{n}"] = g
    return out


@pytest.fixture(scope="module")
def reports(gloo_world: Any) -> list[dict[str, torch.Tensor]]:
    return gloo_world(_units_worker, WORLD)


@pytest.mark.parametrize("case", list(CASES))
def test_materialize_unit_gives_each_rank_its_slice_of_the_mean_gradient_at_world_two(
    reports: list[dict[str, torch.Tensor]], case: str
) -> None:
    for rank, rep in enumerate(reports):
        expected = expected_grads(case, WORLD, rank)
        for queue in (False, True):
            for n in TRAINABLE:
                got = rep[f"{case}/{queue}/{n}"]
                assert got.shape == expected[n].shape, (case, n)
                torch.testing.assert_close(got, expected[n], rtol=1e-6, atol=1e-6)
