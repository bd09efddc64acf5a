"""Schedules: optax semantics, DeepSpeed's formulas and step origin, and no host syncs.

DeepSpeed's schedules are checked two ways: against plain-Python formulas indexed by DeepSpeed's
``last_batch_iteration`` (``it``), and against a compact re-implementation of DeepSpeed's stateful
scheduler objects driven the way its engine drives them (constructor writes the ``it = -1`` value,
one ``step()`` after each applied optimizer step, none after an overflow).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from funczero import optim

N = 400  # counts checked per schedule


def _values(schedule: Callable[[torch.Tensor], torch.Tensor], n: int = N) -> list[float]:
    out = []
    for c in range(n):
        v = schedule(torch.tensor(c, dtype=torch.int64))
        assert v.dtype == torch.float32 and v.ndim == 0
        out.append(float(v))
    return out


def _assert_matches(got: list[float], expected: list[float], what: str) -> None:
    for c, (g, e) in enumerate(zip(got, expected)):
        # float32 output of a float64 computation: within one float32 rounding of the reference.
        assert math.isclose(g, e, rel_tol=2e-7, abs_tol=1e-12), f"{what}: count {c}: {g} != {e}"


# --------------------------------------------------------------------------- DeepSpeed formulas


def _gamma(it: int, w: int, kind: str) -> float:
    return math.log(it + 1) / math.log(w) if kind == "log" else it / w


def ds_warmup_lr(it, *, warmup_max_lr, warmup_min_lr=0.0, warmup_num_steps=1000,
                 warmup_type="log"):  # fmt: skip
    if it < 0:
        return warmup_min_lr
    w = max(2, warmup_num_steps)
    g = _gamma(it, w, warmup_type) if it < w else 1.0
    return warmup_min_lr + (warmup_max_lr - warmup_min_lr) * g


def ds_warmup_decay_lr(it, *, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001,
                       warmup_num_steps=1000, warmup_type="log"):  # fmt: skip
    if it < 0:
        return warmup_min_lr
    w = max(2, warmup_num_steps)
    if it < w:
        g = _gamma(it, w, warmup_type)
    else:
        g = max(0.0, float(total_num_steps - it) / float(max(1.0, total_num_steps - w)))
    return warmup_min_lr + (warmup_max_lr - warmup_min_lr) * g


def ds_warmup_cosine_lr(it, *, base_lr, total_num_steps, warmup_min_ratio=0.0,
                        warmup_num_steps=1000, cos_min_ratio=0.0001, warmup_type="log"):  # fmt: skip
    if it < 0:
        return 0.0
    w = max(2, warmup_num_steps)
    if it < w:
        ratio = warmup_min_ratio + _gamma(it, w, warmup_type) * (1.0 - warmup_min_ratio)
    else:
        progress = min(1.0, (it - w + 1) / max(1, total_num_steps - w))
        ratio = (1 + math.cos(math.pi * progress)) / 2
        ratio = max(0.0, cos_min_ratio + (1.0 - cos_min_ratio) * ratio)
    return base_lr * ratio


def ds_one_cycle(it, *, cycle_min_lr, cycle_max_lr, decay_lr_rate=0.0, cycle_first_step_size=2000,
                 cycle_second_step_size=None, cycle_first_stair_count=0,
                 cycle_second_stair_count=None, decay_step_size=0, cycle_momentum=True,
                 cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.0):  # fmt: skip
    """(lr, momentum) at iteration ``it >= 0``."""
    s1 = float(cycle_first_step_size)
    s2 = float(cycle_second_step_size) if cycle_second_step_size is not None else s1
    total, ratio = s1 + s2, s1 / (s1 + s2)
    k2 = cycle_first_stair_count if cycle_second_stair_count is None else cycle_second_stair_count
    b = it + 1
    x = 1.0 + b / total - math.floor(1 + b / total)
    if x <= ratio:
        scale, k = x / ratio, cycle_first_stair_count
    else:
        scale, k = (x - 1) / (ratio - 1), k2
    if k > 0:
        ci = b % total
        pos = ci * k / s1 if ci <= s1 else (total - ci) * k / s2
        scale = math.floor(pos) / k
    if it < total:
        lr = cycle_min_lr + (cycle_max_lr - cycle_min_lr) * scale
        mom = cycle_max_mom - (cycle_max_mom - cycle_min_mom) * scale
    else:
        j = it - total + 1
        lr, mom = cycle_min_lr, cycle_max_mom
        if decay_step_size != 0 and decay_lr_rate != 0:
            lr = cycle_min_lr / (1 + decay_lr_rate * j / decay_step_size)
        if decay_step_size != 0 and decay_mom_rate != 0:
            mom = cycle_max_mom * (1 + decay_mom_rate * j / decay_step_size)
    return lr, mom


def ds_lr_range_test(it, *, lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000,
                     lr_range_test_step_rate=1.0, lr_range_test_staircase=False):  # fmt: skip
    i = float(it + 1) / lr_range_test_step_size
    if lr_range_test_staircase:
        i = math.floor(i)
    return lr_range_test_min_lr * (1 + lr_range_test_step_rate * i)


class DeepSpeedSchedulerObject:
    """DeepSpeed's scheduler-object protocol, compactly: constructor writes ``it = -1``."""

    def __init__(self, optimizer: Any, lr_at: Callable[[int], float],
                 mom_at: Callable[[int], float] | None = None, first_mom: float = 0.0) -> None:  # fmt: skip
        self.optimizer, self.lr_at, self.mom_at = optimizer, lr_at, mom_at
        self.last_batch_iteration = -1
        optimizer.param_groups[0]["lr"] = lr_at(-1)
        if mom_at is not None:
            optimizer.param_groups[0]["betas"] = (first_mom, 0.99)

    def step(self) -> None:
        self.last_batch_iteration += 1
        self.optimizer.param_groups[0]["lr"] = self.lr_at(self.last_batch_iteration)
        if self.mom_at is not None:
            self.optimizer.param_groups[0]["betas"] = (self.mom_at(self.last_batch_iteration), 0.99)


def _engine(make_scheduler, base_lr: float, steps: int, overflow: set[int]) -> list[tuple]:
    """Drive a scheduler like DeepSpeed's engine; return (lr, beta1) of each *applied* step."""
    optimizer = SimpleNamespace(param_groups=[{"lr": base_lr, "betas": (0.9, 0.999)}])
    scheduler = make_scheduler(optimizer)
    applied = []
    for step in range(steps):
        group = optimizer.param_groups[0]
        if step in overflow:  # the engine skips both the update and scheduler.step()
            continue
        applied.append((group["lr"], group["betas"][0]))
        scheduler.step()
    return applied


BASE_LR = 0.02
DS_CASES: list[tuple[str, dict[str, Any]]] = [
    ("WarmupLR", {}),
    ("WarmupLR", {"warmup_min_lr": 1e-4, "warmup_max_lr": 0.5, "warmup_num_steps": 37}),
    ("WarmupLR", {"warmup_num_steps": 1, "warmup_type": "linear"}),
    ("WarmupLR", {"warmup_min_lr": 0.01, "warmup_num_steps": 50, "warmup_type": "linear"}),
    ("WarmupDecayLR", {"total_num_steps": 300}),
    ("WarmupDecayLR", {"total_num_steps": 250, "warmup_num_steps": 40, "warmup_max_lr": 0.1,
                       "warmup_min_lr": 0.001, "warmup_type": "linear"}),
    ("WarmupDecayLR", {"total_num_steps": 20, "warmup_num_steps": 30}),  # T < W
    ("WarmupCosineLR", {"total_num_steps": 300, "warmup_num_steps": 30}),
    ("WarmupCosineLR", {"total_num_steps": 200, "warmup_num_steps": 25, "warmup_min_ratio": 0.1,
                        "cos_min_ratio": 0.05, "warmup_type": "linear"}),
    ("WarmupCosineLR", {"total_num_steps": 10, "warmup_num_steps": 50}),  # no decay window
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-1, "cycle_first_step_size": 60}),
    ("OneCycle", {"cycle_min_lr": 0.01, "cycle_max_lr": 0.2, "cycle_first_step_size": 50,
                  "cycle_second_step_size": 70, "cycle_first_stair_count": 5,
                  "cycle_second_stair_count": 7, "decay_step_size": 10, "decay_lr_rate": 0.5,
                  "decay_mom_rate": 0.01, "cycle_min_mom": 0.85, "cycle_max_mom": 0.95}),
    ("OneCycle", {"cycle_min_lr": 0.0, "cycle_max_lr": 1.0, "cycle_first_step_size": 30,
                  "cycle_second_step_size": 17, "cycle_first_stair_count": 4,
                  "decay_step_size": 7, "decay_lr_rate": 0.1, "cycle_momentum": False}),
    ("LRRangeTest", {}),
    ("LRRangeTest", {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 13,
                     "lr_range_test_step_rate": 3.0, "lr_range_test_staircase": True}),
]  # fmt: skip


def _reference(kind: str, params: dict[str, Any]) -> tuple[Callable, Callable | None, float]:
    """(lr at it, momentum at it or None, momentum written by the constructor)."""
    if kind == "WarmupLR":
        p = {"warmup_max_lr": BASE_LR, **params}
        return (lambda it: ds_warmup_lr(it, **p)), None, 0.0
    if kind == "WarmupDecayLR":
        return (lambda it: ds_warmup_decay_lr(it, **params)), None, 0.0
    if kind == "WarmupCosineLR":
        return (lambda it: ds_warmup_cosine_lr(it, base_lr=BASE_LR, **params)), None, 0.0
    if kind == "OneCycle":
        # The constructor writes cycle_min_lr (and cycle_min_mom) for it = -1.
        lr = lambda it: params["cycle_min_lr"] if it < 0 else ds_one_cycle(it, **params)[0]
        mom = lambda it: ds_one_cycle(it, **params)[1]
        momentum = params.get("cycle_momentum", True)
        return lr, (mom if momentum else None), params.get("cycle_min_mom", 0.8)
    return (lambda it: ds_lr_range_test(it, **params)), None, 0.0


@pytest.mark.parametrize(("kind", "params"), DS_CASES, ids=[c[0] for c in DS_CASES])
def test_deepspeed_schedule_equals_formula_at_iteration_count_minus_one(kind, params) -> None:
    lr_sched, mom_sched = optim.from_deepspeed(kind, params, base_lr=BASE_LR)
    lr_at, mom_at, first_mom = _reference(kind, params)
    _assert_matches(_values(lr_sched), [lr_at(c - 1) for c in range(N)], f"{kind} lr")
    if mom_at is None:
        assert mom_sched is None
    else:
        expected = [first_mom] + [mom_at(c - 1) for c in range(1, N)]
        _assert_matches(_values(mom_sched), expected, f"{kind} momentum")


@pytest.mark.parametrize(("kind", "params"), DS_CASES, ids=[c[0] for c in DS_CASES])
def test_deepspeed_engine_stepping_with_overflow_skips(kind, params) -> None:
    lr_at, mom_at, first_mom = _reference(kind, params)
    overflow = {0, 1, 5, 17, 18, 100}
    applied = _engine(
        lambda opt: DeepSpeedSchedulerObject(opt, lr_at, mom_at, first_mom), BASE_LR, N, overflow
    )
    lr_sched, mom_sched = optim.from_deepspeed(kind, params, base_lr=BASE_LR)
    # Our count advances only on applied updates, exactly like DeepSpeed's scheduler.
    _assert_matches(_values(lr_sched, len(applied)), [a[0] for a in applied], f"{kind} lr")
    if mom_sched is not None:
        _assert_matches(_values(mom_sched, len(applied)), [a[1] for a in applied], "momentum")


def test_documented_deepspeed_quirks() -> None:
    lr, _ = optim.from_deepspeed("WarmupCosineLR", {"total_num_steps": 100}, base_lr=0.1)
    assert float(lr(torch.tensor(0))) == 0.0  # the first update trains at lr 0
    lr, _ = optim.from_deepspeed("WarmupLR", {"warmup_min_lr": 0.01}, base_lr=0.1)
    assert float(lr(torch.tensor(0))) == float(lr(torch.tensor(1))) == pytest.approx(0.01)
    assert float(lr(torch.tensor(10**6))) == pytest.approx(0.1)  # default max is the base lr
    lr, _ = optim.from_deepspeed(
        "WarmupDecayLR", {"total_num_steps": 10, "warmup_num_steps": 2}, base_lr=0.5
    )
    assert max(_values(lr, 20)) == pytest.approx(0.001)  # DeepSpeed's default, not base_lr
    _, mom = optim.one_cycle(cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=10)
    assert float(mom(torch.tensor(0))) == pytest.approx(0.8)  # constructor value
    assert float(mom(torch.tensor(1))) == pytest.approx(0.9 - 0.1 / 10)


def test_from_deepspeed_errors_name_the_problem_and_the_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"'warmuplr' \(did you mean 'WarmupLR'\?\).*OneCycle"):
        optim.from_deepspeed("warmuplr", {}, base_lr=0.1)
    with pytest.raises(ValueError, match=r"unknown DeepSpeed scheduler type 'StepLR'"):
        optim.from_deepspeed("StepLR", {}, base_lr=0.1)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['warmup_steps'\].*warmup_num"):
        optim.from_deepspeed("WarmupLR", {"warmup_steps": 10}, base_lr=0.1)
    with pytest.raises(ValueError, match=r"total_num_steps='auto' is a HuggingFace"):
        optim.from_deepspeed("WarmupDecayLR", {"total_num_steps": "auto"}, base_lr=0.1)
    with pytest.raises(ValueError, match=r"missing required parameter\(s\) \['total_num_steps'\]"):
        optim.from_deepspeed("WarmupCosineLR", {}, base_lr=0.1)
    with pytest.raises(ValueError, match=r"missing required parameter\(s\) \['cycle_max_lr'\]"):
        optim.from_deepspeed("OneCycle", {"cycle_min_lr": 0.1}, base_lr=0.1)
    with pytest.raises(ValueError, match=r"warmup_type='cosine' is not one of"):
        optim.from_deepspeed("WarmupLR", {"warmup_type": "cosine"}, base_lr=0.1)
    with pytest.raises(ValueError, match=r"warmup_num_steps=0 must be a positive integer"):
        optim.from_deepspeed("WarmupLR", {"warmup_num_steps": 0}, base_lr=0.1)
    with pytest.raises(ValueError, match=r"per-param-group list"):
        optim.from_deepspeed("WarmupLR", {"warmup_max_lr": [0.1, 0.2]}, base_lr=0.1)
    with pytest.raises(ValueError, match=r"last_batch_iteration must be -1"):
        optim.from_deepspeed("WarmupLR", {"last_batch_iteration": 5}, base_lr=0.1)
    lr, _ = optim.from_deepspeed("WarmupLR", {"last_batch_iteration": -1}, base_lr=0.1)
    assert callable(lr)


# --------------------------------------------------------------------------- optax semantics


def _linear(c, init, end, steps, begin=0):
    if steps == 0:
        return init
    c = min(max(c - begin, 0), steps)
    return (init - end) * (1 - c / steps) + end


def _cosine(c, init, decay, alpha=0.0, exponent=1.0):
    c = min(c, decay)
    return init * ((1 - alpha) * (0.5 * (1 + math.cos(math.pi * c / decay))) ** exponent + alpha)


@pytest.mark.parametrize(
    ("schedule", "reference"),
    [
        (optim.constant_schedule(0.3), lambda c: 0.3),
        (optim.linear_schedule(1.0, 0.1, 100), lambda c: _linear(c, 1.0, 0.1, 100)),
        (optim.linear_schedule(0.0, 2.0, 50, transition_begin=30),
         lambda c: _linear(c, 0.0, 2.0, 50, 30)),
        (optim.linear_schedule(0.5, 2.0, 0), lambda c: 0.5),
        (optim.cosine_decay_schedule(1.0, 150), lambda c: _cosine(c, 1.0, 150)),
        (optim.cosine_decay_schedule(2.0, 90, alpha=0.1, exponent=2.0),
         lambda c: _cosine(c, 2.0, 90, 0.1, 2.0)),
        (optim.warmup_cosine_decay_schedule(0.0, 1e-3, 20, 220, end_value=1e-5),
         lambda c: _linear(c, 0.0, 1e-3, 20) if c < 20 else _cosine(c - 20, 1e-3, 200, 1e-2)),
        (optim.join_schedules([optim.constant_schedule(1.0), optim.linear_schedule(1.0, 0.0, 10),
                               optim.constant_schedule(0.5)], [5, 25]),
         lambda c: 1.0 if c < 5 else (_linear(c - 5, 1.0, 0.0, 10) if c < 25 else 0.5)),
    ],
    ids=["constant", "linear", "linear_begin", "linear_zero_steps", "cosine", "cosine_alpha_exp",
         "warmup_cosine", "join"],
)  # fmt: skip
def test_generic_schedules_follow_optax(schedule, reference) -> None:
    _assert_matches(_values(schedule), [reference(c) for c in range(N)], "schedule")


def test_generic_schedule_validation() -> None:
    with pytest.raises(ValueError, match=r"decay_steps=0 must be >= 1"):
        optim.cosine_decay_schedule(1.0, 0)
    with pytest.raises(ValueError, match=r"decay_steps=10 must be > warmup_steps=10"):
        optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10)
    with pytest.raises(ValueError, match=r"2 schedules and 2 boundaries"):
        optim.join_schedules([optim.constant_schedule(1.0)] * 2, [1, 2])
    with pytest.raises(TypeError, match=r"transition_steps=1.5 must be an int"):
        optim.linear_schedule(1.0, 0.0, 1.5)


# --------------------------------------------------------------------------- no host sync


def _all_schedules() -> list[Callable]:
    scheds = [
        optim.constant_schedule(1.0),
        optim.linear_schedule(1.0, 0.0, 10, 3),
        optim.cosine_decay_schedule(1.0, 10),
        optim.warmup_cosine_decay_schedule(0.0, 1.0, 3, 10),
        optim.join_schedules([optim.constant_schedule(1.0), optim.constant_schedule(2.0)], [2]),
    ]
    for kind, params in DS_CASES:
        lr, mom = optim.from_deepspeed(kind, params, base_lr=BASE_LR)
        scheds += [lr] + ([mom] if mom is not None else [])
    return scheds


@pytest.fixture
def forbid_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    def sync(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a schedule read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_schedules_never_read_tensor_values_on_the_host(forbid_host_sync) -> None:
    counts = [torch.tensor(c, dtype=torch.int64) for c in (0, 1, 7, 500)]
    for schedule in _all_schedules():
        for c in counts:
            schedule(c)


def test_schedules_work_on_meta_counts() -> None:
    """A meta tensor has no data, so any host read would fail; output keeps the device."""
    count = torch.zeros((), dtype=torch.int64, device="meta")
    for schedule in _all_schedules():
        out = schedule(count)
        assert out.device.type == "meta" and out.dtype == torch.float32


def test_inplace_steps_with_schedules_do_not_read_tensors_on_the_host(forbid_host_sync) -> None:
    lr, mom = optim.one_cycle(cycle_min_lr=1e-3, cycle_max_lr=1e-2, cycle_first_step_size=3)
    params = {"w": torch.ones(4), "b": torch.zeros(2)}
    opts = (optim.adamw(lr, mom), optim.adamw(lr), optim.sgd(lr, 0.9), optim.lamb(lr, mom),
            optim.lion(lr, mom), optim.adagrad(lr, lr_decay=0.1))  # fmt: skip
    for opt in opts:
        state = opt.init(params)
        for found in (None, torch.tensor(0.0), torch.tensor(1.0)):  # foreach/fused and generic
            grads = {"w": torch.ones(4), "b": torch.ones(2)}
            state = opt.update_(grads, state, params, found_inf=found, reduce_fn=lambda x: x)
            opt.learning_rate(state)
