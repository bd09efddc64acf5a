"""Each collective on 2 gloo ranks against the single-process reference from both ranks' inputs.

One spawned world runs every collective (spawning is the slow part); the tests below read its
reports. fp32 averages of two values are exact ((a + b) / 2 rounds once, however it is ordered),
so fp32 results are compared exactly; bf16 reductions within bf16 rounding.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.distributed as dist

from funczero.parallel.collectives import (
    all_gather_labelled,
    all_gather_unit,
    all_gather_unit_async,
    all_reduce_mean_,
    all_reduce_sum,
    all_reduce_unit_async,
    reduce_scatter_unit,
    reduce_scatter_unit_async,
)
from funczero.parallel.sharding import ShardSpec, Unit
from funczero.testing.distributed import run_distributed

WORLD = 2
SHAPES = {"w": (3, 3), "b": (5,), "s": (1,)}  # every one needs padding at world 2
MEAN_SIZES = (3, 5, 2, 7, 11)  # tensor sizes for all_reduce_mean_; index 2 is stored in bf16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_unit(world: int = WORLD) -> Unit:
    return Unit(
        "blk", tuple(SHAPES), tuple(ShardSpec(n, torch.Size(s), world) for n, s in SHAPES.items())
    )


def grads_of(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s local full gradients."""
    g = torch.Generator().manual_seed(10 + rank)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def global_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def mean_inputs(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(30 + rank)
    out = [torch.randn(n, generator=g) for n in MEAN_SIZES]
    out[2] = out[2].to(torch.bfloat16)
    return out


def bf16_probe(rank: int) -> torch.Tensor:
    # 1 + 2**-10 and 3 + 2**-10 round to 1 and 3 in bf16: a bf16 average is exactly 2, an fp32
    # one is 2 + 2**-10.
    return torch.full((4,), (1.0, 3.0)[rank] + 2.0**-10)


def _record_all_reduce(calls: list[tuple[int, torch.dtype]]) -> Any:
    real = dist.all_reduce

    def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((tensor.numel(), tensor.dtype))
        return real(tensor, *args, **kwargs)

    return real, recording


def _collectives_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unit = make_unit(world)

    # all_reduce_mean_: buckets of at most bucket_numel elements, reduced in `dtype`, in place.
    for tag, dtype, bucket in (("fp32", torch.float32, 8), ("bf16", torch.bfloat16, 2**27)):
        tensors = mean_inputs(rank) + [bf16_probe(rank)]
        calls: list[tuple[int, torch.dtype]] = []
        real, recording = _record_all_reduce(calls)
        dist.all_reduce = recording  # type: ignore[assignment]
        try:
            all_reduce_mean_(
                tensors, group=None, world_size=world, dtype=dtype, bucket_numel=bucket
            )
        finally:
            dist.all_reduce = real
        assert all(d == dtype for _, d in calls), calls
        out[f"mean/{tag}/buckets"] = torch.tensor([n for n, _ in calls])
        for i, t in enumerate(tensors):
            out[f"mean/{tag}/{i}"] = t

    # reduce_scatter_unit (sync and async), with and without all-reduce, in fp32 and bf16.
    for tag, dtype in DTYPES.items():
        for use_all_reduce in (False, True):
            key = f"rs/{tag}/{'ar' if use_all_reduce else 'rs'}"
            shards = reduce_scatter_unit(
                unit,
                grads_of(rank),
                group=None,
                rank=rank,
                dtype=dtype,
                use_all_reduce=use_all_reduce,
            )
            later, pending = reduce_scatter_unit_async(
                unit,
                grads_of(rank),
                group=None,
                rank=rank,
                dtype=dtype,
                use_all_reduce=use_all_reduce,
            )
            pending.wait()
            assert list(shards) == list(unit.params) == list(later)
            for n in unit.params:
                out[f"{key}/{n}"] = shards[n]
                out[f"{key}/async/{n}"] = later[n]
            # The shards must not keep the [W, S] reduction buffer alive.
            out[f"{key}/storage_bytes"] = torch.tensor(
                [shards[n].untyped_storage().nbytes() for n in unit.params]
            )
    # bf16 gradients (bf16 compute) reduced in fp32.
    bf16_grads = {n: g.to(torch.bfloat16) for n, g in grads_of(rank).items()}
    for n, t in reduce_scatter_unit(
        unit, bf16_grads, group=None, rank=rank, dtype=torch.float32
    ).items():
        out[f"rs/bf16-in/{n}"] = t

    # all_reduce_unit_async: full averaged gradients of out_dtype.
    for tag, dtype in DTYPES.items():
        full, pending = all_reduce_unit_async(
            unit, grads_of(rank), group=None, world_size=world, dtype=dtype
        )
        pending.wait()
        for n in unit.params:
            out[f"ar/{tag}/{n}"] = full[n]

    # all_gather_unit (sync and async) from this rank's shards of the global parameters.
    params = global_params()
    shards = {n: ShardSpec(n, params[n].shape, world).shard(params[n], rank) for n in SHAPES}
    for tag, dtype in DTYPES.items():
        full = all_gather_unit(unit, shards, group=None, dtype=dtype)
        later = all_gather_unit_async(unit, shards, group=None, dtype=dtype).wait()
        for n in unit.params:
            out[f"ag/{tag}/{n}"] = full[n]
            out[f"ag/{tag}/async/{n}"] = later[n]

    # all_gather_labelled: every rank's tensor, in rank order.
    parts = [torch.empty(3) for _ in range(world)]
    all_gather_labelled(parts, torch.full((3,), rank + 0.5), "all-gather of a probe", group=None)
    out["agl"] = torch.stack(parts)

    # all_reduce_sum: a new tensor, the input untouched.
    x = torch.tensor([rank + 1.0, 2.0 * rank, -3.0])
    y = all_reduce_sum(x, group=None, world_size=world)
    assert y is not x
    out["sum/x"], out["sum/y"] = x, y
    return out


@pytest.fixture(scope="module")
def reports(gloo_world: Any) -> list[dict[str, torch.Tensor]]:
    return gloo_world(_collectives_worker, WORLD)


def mean_of(values: list[torch.Tensor]) -> torch.Tensor:
    return sum(v.double() for v in values) / len(values)  # type: ignore[return-value]


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_all_reduce_mean_averages_in_place_in_buckets_of_at_most_bucket_numel(
    reports: list[dict[str, torch.Tensor]],
) -> None:
    inputs = [mean_inputs(r) + [bf16_probe(r)] for r in range(WORLD)]
    for rep in reports:
        # Sizes 3, 5 | 2 | 7 | 11 | 4: a bucket closes before the tensor that would overflow it,
        # and a tensor larger than the bucket travels alone.
        assert rep["mean/fp32/buckets"].tolist() == [8, 2, 7, 11, 4]
        for i in range(len(MEAN_SIZES) + 1):
            t = rep[f"mean/fp32/{i}"]
            assert t.dtype == inputs[0][i].dtype, "the tensors keep their dtype"
            expected = mean_of([x[i] for x in inputs])
            if t.dtype == torch.float32:
                exact(t, expected.float())
            else:
                exact(t, expected.to(t.dtype))
    probe = len(MEAN_SIZES)
    exact(reports[0][f"mean/fp32/{probe}"], torch.full((4,), 2.0 + 2.0**-10))


def test_all_reduce_mean_reduces_in_the_requested_dtype(
    reports: list[dict[str, torch.Tensor]],
) -> None:
    inputs = [mean_inputs(r) for r in range(WORLD)]
    for rep in reports:
        assert rep["mean/bf16/buckets"].tolist() == [sum(MEAN_SIZES) + 4], "one bucket"
        for i in range(len(MEAN_SIZES)):
            expected = mean_of([x[i].to(torch.bfloat16) for x in inputs])
            torch.testing.assert_close(
                rep[f"mean/bf16/{i}"].double(), expected, rtol=8e-3, atol=1e-2
            )
        # Averaged in bf16: the 2**-10 parts were rounded away before the reduction.
        exact(rep[f"mean/bf16/{len(MEAN_SIZES)}"], torch.full((4,), 2.0))


@pytest.mark.parametrize("mode", ["rs", "ar"])
@pytest.mark.parametrize("tag", list(DTYPES))
def test_reduce_scatter_unit_returns_this_ranks_shard_of_the_mean_gradient(
    reports: list[dict[str, torch.Tensor]], tag: str, mode: str
) -> None:
    unit = make_unit()
    dtype = DTYPES[tag]
    mean = {n: mean_of([grads_of(r)[n].to(dtype) for r in range(WORLD)]) for n in SHAPES}
    for rank, rep in enumerate(reports):
        for spec in unit.specs:
            expected = spec.shard(mean[spec.name], rank)
            for key in (f"rs/{tag}/{mode}/{spec.name}", f"rs/{tag}/{mode}/async/{spec.name}"):
                got = rep[key]
                assert got.dtype == torch.float32 and got.shape == (spec.shard_numel,), key
                if dtype == torch.float32:
                    exact(got, expected.float())
                else:
                    torch.testing.assert_close(got.double(), expected, rtol=8e-3, atol=1e-2)
            assert not rep[f"rs/{tag}/{mode}/{spec.name}"][
                spec.bounds(rank)[1] - spec.bounds(rank)[0] :
            ].any()


@pytest.mark.parametrize("mode", ["rs", "ar"])
def test_reduce_scatter_unit_shards_do_not_keep_the_world_sized_buffer_alive(
    reports: list[dict[str, torch.Tensor]], mode: str
) -> None:
    unit = make_unit()
    for rep in reports:
        for tag in DTYPES:
            assert rep[f"rs/{tag}/{mode}/storage_bytes"].tolist() == [unit.shard_numel * 4] * len(
                SHAPES
            )


def test_reduce_scatter_unit_reduces_bf16_gradients_in_fp32(
    reports: list[dict[str, torch.Tensor]],
) -> None:
    unit = make_unit()
    mean = {n: mean_of([grads_of(r)[n].to(torch.bfloat16) for r in range(WORLD)]) for n in SHAPES}
    for rank, rep in enumerate(reports):
        for spec in unit.specs:
            got = rep[f"rs/bf16-in/{spec.name}"]
            assert got.dtype == torch.float32
            exact(got, spec.shard(mean[spec.name], rank).float())


@pytest.mark.parametrize("tag", list(DTYPES))
def test_all_reduce_unit_async_returns_full_mean_gradients_in_fp32(
    reports: list[dict[str, torch.Tensor]], tag: str
) -> None:
    dtype = DTYPES[tag]
    for rep in reports:
        for n, shape in SHAPES.items():
            got = rep[f"ar/{tag}/{n}"]
            expected = mean_of([grads_of(r)[n].to(dtype) for r in range(WORLD)])
            assert got.dtype == torch.float32 and got.shape == shape
            if dtype == torch.float32:
                exact(got, expected.float())
            else:
                torch.testing.assert_close(got.double(), expected, rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("tag", list(DTYPES))
def test_all_gather_unit_rebuilds_the_global_parameters_in_the_compute_dtype(
    reports: list[dict[str, torch.Tensor]], tag: str
) -> None:
    params = global_params()
    for rep in reports:
        for n in SHAPES:
            for key in (f"ag/{tag}/{n}", f"ag/{tag}/async/{n}"):
                assert rep[key].dtype == DTYPES[tag]
                exact(rep[key], params[n].to(DTYPES[tag]))


def test_all_gather_labelled_gathers_every_ranks_tensor_in_rank_order(
    reports: list[dict[str, torch.Tensor]],
) -> None:
    for rep in reports:
        exact(rep["agl"], torch.tensor([[0.5] * 3, [1.5] * 3]))


def test_all_reduce_sum_returns_the_sum_and_leaves_its_input_alone(
    reports: list[dict[str, torch.Tensor]],
) -> None:
    xs = [torch.tensor([r + 1.0, 2.0 * r, -3.0]) for r in range(WORLD)]
    for rank, rep in enumerate(reports):
        exact(rep["sum/x"], xs[rank])
        exact(rep["sum/y"], xs[0] + xs[1])


def test_collectives_at_world_one_communicate_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a world-1 collective must not call torch.distributed")

    for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, forbidden)
    unit = make_unit(1)
    grads = grads_of(0)
    tensors = [g.clone() for g in grads.values()]
    all_reduce_mean_(tensors, group=None, world_size=1, dtype=torch.bfloat16)
    for t, g in zip(tensors, grads.values()):
        exact(t, g)
    shards = reduce_scatter_unit(unit, grads, group=None, rank=0, dtype=torch.float32)
    for n in SHAPES:
        exact(shards[n], grads[n].reshape(-1))
    full, pending = all_reduce_unit_async(
        unit, grads, group=None, world_size=1, dtype=torch.float32
    )
    pending.wait()
    for n in SHAPES:
        exact(full[n], grads[n])
    gathered = all_gather_unit(unit, shards, group=None, dtype=torch.float32)
    for n in SHAPES:
        exact(gathered[n], grads[n])
    x = torch.ones(2)
    assert all_reduce_sum(x, group=None, world_size=1) is x


def test_pending_wait_finishes_once_and_returns_the_same_result() -> None:
    unit = make_unit(1)
    shards = {
        n: ShardSpec(n, torch.Size(s), 1).shard(global_params()[n], 0) for n, s in SHAPES.items()
    }
    pending = all_gather_unit_async(unit, shards, group=None, dtype=torch.float32)
    first = pending.wait()
    assert pending.wait() is first


class _SkipsABlockOnRank1(torch.nn.Module):
    """Rank 1 skips block 1 (a data-dependent branch): the ranks' collectives diverge."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if not (i == 1 and torch.distributed.get_rank() == 1):
                x = block(x)
        return x


def _diverging_worker(rank: int, world: int, out_dir: str) -> None:
    from pathlib import Path

    import funczero
    from funczero import optim
    from funczero.module import extract_tensors, release_module_tensors
    from funczero.parallel.collectives import CollectiveError, step_scope
    from funczero.parallel.plan import build_plan

    torch.manual_seed(0)
    model = _SkipsABlockOnRank1()
    plan = build_plan(model, stage=3)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.sgd(0.1)
    state = funczero.init_state(plan, opt, params, buffers)
    step = funczero.make_train_step(lambda m, b: m(b).pow(2).mean(), opt, plan)
    try:
        for i in range(3):
            with step_scope(i):  # what train_step does: errors name the step
                state, metrics = step(state, torch.ones(2, 64))
                float(metrics["loss"])
    except CollectiveError as e:
        Path(out_dir, f"rank{rank}").write_text(str(e))
        raise


def test_ranks_that_diverge_fail_with_an_error_naming_the_collective_and_unit(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("FUNCZERO_DIST_TIMEOUT", "10")  # seconds a collective waits
    with pytest.raises((RuntimeError, TimeoutError)):
        run_distributed(_diverging_worker, 2, str(tmp_path), timeout=180)
    messages = [p.read_text() for p in sorted(tmp_path.glob("rank*"))]
    assert messages, "no rank raised a CollectiveError"
    assert any(" of unit " in m or "gradient norm and loss" in m for m in messages), messages
    assert all("same collectives in the same order" in m for m in messages), messages
    assert all(re.match(r"rank \d, step [0-2]: ", m) for m in messages), messages
