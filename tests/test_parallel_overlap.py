"""ReduceQueue, PrefetchOrder, Prefetcher and Regather with recording fakes (no process group)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Hashable
from typing import Any

import pytest
import torch

from funczero.parallel.overlap import Prefetcher, PrefetchOrder, ReduceQueue, Regather


class FakePending:
    """A collective in flight that records when it is waited (and fails if waited twice)."""

    def __init__(self, key: Hashable, log: list[tuple[str, Hashable]]) -> None:
        self.key, self.log, self.waits = key, log, 0

    def wait(self) -> Any:
        self.waits += 1
        assert self.waits == 1, f"{self.key} waited twice"
        self.log.append(("wait", self.key))
        return {"full": self.key}


class FakeGathers:
    """``gather_async`` for a Prefetcher: logs every issue and every wait."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Hashable]] = []
        self.issued: list[FakePending] = []

    def __call__(self, unit: Hashable) -> FakePending:
        self.log.append(("issue", unit))
        self.issued.append(FakePending(unit, self.log))
        return self.issued[-1]

    def issues(self) -> list[Hashable]:
        return [k for what, k in self.log if what == "issue"]

    def all_waited_once(self) -> bool:
        return all(p.waits == 1 for p in self.issued)


# ReduceQueue


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_reduce_queue_keeps_at_most_depth_reductions_in_flight(depth: int) -> None:
    log: list[tuple[str, Hashable]] = []
    queue = ReduceQueue(depth=depth)
    pendings = [FakePending(i, log) for i in range(5)]
    for i, p in enumerate(pendings):
        queue.submit(p)
        # Submitting unit i waits, oldest first, for everything but the newest `depth`.
        assert [k for _, k in log] == list(range(max(0, i + 1 - depth)))
    queue.drain()
    assert [k for _, k in log] == list(range(5))
    assert all(p.waits == 1 for p in pendings)
    queue.drain()  # nothing left: no second wait
    assert len(log) == 5


def test_reduce_queue_default_depth_waits_for_the_previous_unit_when_the_next_is_submitted() -> (
    None
):
    log: list[tuple[str, Hashable]] = []
    queue = ReduceQueue()
    queue.submit(FakePending("block1", log))
    assert log == []
    queue.submit(FakePending("block0", log))
    assert log == [("wait", "block1")]
    queue.drain()
    assert log == [("wait", "block1"), ("wait", "block0")]


# PrefetchOrder


def test_prefetch_order_plans_in_the_given_order_before_anything_ran() -> None:
    assert PrefetchOrder().planned(["a", "b", "c"]) == ["a", "b", "c"]


def test_prefetch_order_learns_the_order_the_last_forward_ran_in() -> None:
    order = PrefetchOrder()
    order.record(["c", "a", "b"])
    assert order.planned(["a", "b", "c"]) == ["c", "a", "b"]
    order.record(["b", "a", "b", "c"])  # a unit run twice is planned once, where it first ran
    assert order.planned(["a", "b", "c"]) == ["b", "a", "c"]


def test_prefetch_order_falls_back_to_the_given_order_when_the_units_differ() -> None:
    order = PrefetchOrder()
    order.record(["c", "a"])  # the last forward skipped "b"
    assert order.planned(["a", "b", "c"]) == ["a", "b", "c"]
    order.record(["c", "b", "a", "d"])  # ...or ran one the plan does not have
    assert order.planned(["a", "b", "c"]) == ["a", "b", "c"]
    order.record([])
    assert order.planned(["a"]) == ["a"]


# Prefetcher


def test_prefetcher_start_issues_the_roots_and_the_first_unit() -> None:
    gathers = FakeGathers()
    p = Prefetcher(["b0", "b1", "b2"], gathers)
    p.start(roots=["wte", "head"])
    assert gathers.issues() == ["wte", "head", "b0"]
    assert ("wait", "wte") not in gathers.log, "issuing must not wait"


def test_prefetcher_issues_next_unit_during_forward() -> None:
    gathers = FakeGathers()
    p = Prefetcher(["b0", "b1", "b2"], gathers)
    p.start(roots=["wte"])
    assert p.take("wte") == {"full": "wte"}
    assert gathers.issues() == ["wte", "b0"], "b0 was already in flight: not issued again"
    assert p.take("b0") == {"full": "b0"}
    assert gathers.issues() == ["wte", "b0", "b1"], "one unit ahead, not two"
    p.take("b1")
    assert gathers.issues() == ["wte", "b0", "b1", "b2"]
    p.take("b2")
    assert gathers.issues() == ["wte", "b0", "b1", "b2"], "nothing after the last unit"
    # A take waits for its own unit, then issues the next, whose gather runs while it computes.
    assert gathers.log.index(("wait", "b0")) < gathers.log.index(("issue", "b1"))
    assert p.order == ["b0", "b1", "b2"]
    p.end_forward()
    assert gathers.all_waited_once()


def test_prefetcher_issues_in_reverse_recorded_order_during_backward() -> None:
    gathers = FakeGathers()
    p = Prefetcher(["b0", "b1", "b2"], gathers)
    p.start(roots=[])
    for unit in ("b0", "b2", "b1"):  # the model ran its blocks out of the planned order
        p.take(unit)
    assert p.order == ["b0", "b2", "b1"]
    p.end_forward()
    gathers.log.clear()
    p.take("b1")  # backward starts with the last unit that ran forward
    assert gathers.issues() == ["b1", "b2"], "then prefetches the one that ran before it"
    p.take("b2")
    assert gathers.issues() == ["b1", "b2", "b0"]
    p.take("b0")
    assert gathers.issues() == ["b1", "b2", "b0"], "nothing before the first unit"
    p.drain()
    assert gathers.all_waited_once()


def test_prefetcher_drops_unused_gathers_at_end_forward() -> None:
    gathers = FakeGathers()
    p = Prefetcher(["b0", "b1", "b2"], gathers)
    p.start(roots=[])
    p.take("b0")  # issues b1, which this forward never takes
    p.end_forward()
    assert gathers.log[-1] == ("wait", "b1"), "an unused gather is waited (its buffers freed)"
    assert gathers.all_waited_once()
    p.take("b1")  # backward: the dropped gather is not reused, a new one is issued
    assert gathers.issues().count("b1") == 2
    p.take("b0")
    p.drain()
    assert gathers.all_waited_once()


def test_prefetcher_backward_does_not_prefetch_units_that_did_not_run_forward() -> None:
    gathers = FakeGathers()
    p = Prefetcher(["b0", "b1"], gathers)
    p.start(roots=[])
    p.take("b0")
    p.end_forward()
    gathers.log.clear()
    p.take("other")  # gathered on demand, not part of the recorded order
    assert gathers.issues() == ["other"]


# Regather


def unit_buffer(seed: int) -> dict[str, torch.Tensor]:
    """A unit's gathered parameters: views of one flat buffer."""
    flat = torch.randn(10, generator=torch.Generator().manual_seed(seed))
    return {"a": flat[:4].view(2, 2), "b": flat[4:6], "c": flat[6:]}


class CountingGather:
    """Regather's ``gather``: returns fresh copies of the unit's values and counts the calls."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        self.values = {n: v.clone() for n, v in values.items()}
        self.calls: list[Hashable] = []
        self.returned: list[weakref.ref[torch.Tensor]] = []

    def __call__(self, unit: Hashable) -> dict[str, torch.Tensor]:
        self.calls.append(unit)
        flat = torch.cat([v.reshape(-1) for v in self.values.values()])
        out = {"a": flat[:4].view(2, 2), "b": flat[4:6], "c": flat[6:]}
        self.returned.append(weakref.ref(out["a"]))
        return out


def test_regather_replaces_a_saved_unit_tensor_by_a_handle_and_gathers_it_on_unpack() -> None:
    full = unit_buffer(0)
    gather = CountingGather(full)
    rg = Regather(gather)
    outside = torch.randn(3)
    assert rg.pack(full["b"]) is full["b"], "nothing registered: tensors are saved as they are"
    rg.register("u", full)
    handle = rg.pack(full["b"])
    assert not isinstance(handle, torch.Tensor)
    assert rg.pack(outside) is outside, "a tensor outside every unit is saved as it is"
    assert gather.calls == []
    torch.testing.assert_close(rg.unpack(handle), full["b"], rtol=0, atol=0)
    torch.testing.assert_close(rg.unpack(rg.pack(full["a"].t())), full["a"].t(), rtol=0, atol=0)
    assert gather.calls == ["u"], "one gather per unit, shared by its saved tensors"
    rg.unregister(full)
    assert rg.pack(full["c"]) is full["c"], "after unregister the storage is not the unit's"


def test_regather_gathers_again_in_backward_once_and_releases_after_release() -> None:
    full = unit_buffer(1)
    gather = CountingGather(full)
    rg = Regather(gather)
    rg.register("u", full)
    x = torch.randn(2, requires_grad=True)
    with rg.hooks():
        # mm and mul save the unit's tensors (a and a slice of c) to compute x's gradient.
        y = (full["a"] @ x).sum() + (full["c"][:2] * x).sum()
    rg.unregister(full)
    expected = full["a"].sum(0) + full["c"][:2]
    for t in full.values():
        t.zero_()  # the forward's buffer is gone: backward must not read it
    assert gather.calls == []
    y.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, expected)
    assert gather.calls == ["u"]
    assert gather.returned[0]() is not None, "kept until the unit's gradients are reduced"
    x.grad = None
    y.backward(retain_graph=True)  # not released yet: the gathered copy is reused
    assert gather.calls == ["u"]
    rg.release("u")
    gc.collect()
    assert gather.returned[0]() is None, "release frees the re-gathered parameters"
    x.grad = None
    y.backward()
    torch.testing.assert_close(x.grad, expected)
    assert gather.calls == ["u", "u"], "after release, a later backward gathers again"
    rg.clear()
    gc.collect()
    assert all(ref() is None for ref in gather.returned)


def test_regather_keeps_other_units_apart() -> None:
    first, second = unit_buffer(2), unit_buffer(3)
    gather_log: list[Hashable] = []
    sources = {"u1": CountingGather(first), "u2": CountingGather(second)}

    def gather(unit: Hashable) -> dict[str, torch.Tensor]:
        gather_log.append(unit)
        return sources[unit](unit)  # type: ignore[index]

    rg = Regather(gather)
    rg.register("u1", first)
    rg.register("u2", second)
    h1, h2 = rg.pack(first["a"]), rg.pack(second["a"])
    torch.testing.assert_close(rg.unpack(h2), second["a"], rtol=0, atol=0)
    torch.testing.assert_close(rg.unpack(h1), first["a"], rtol=0, atol=0)
    assert gather_log == ["u2", "u1"]
    rg.release("u1")
    rg.unpack(h2)
    rg.unpack(h1)
    assert gather_log == ["u2", "u1", "u1"], "releasing u1 leaves u2's copy in place"
