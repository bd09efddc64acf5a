"""The in-place path ``Optimizer.update_``: agreement with the pure path, found_inf, dispatch."""

from __future__ import annotations

from collections.abc import Callable

import optree
import pytest
import torch

from funczero import optim
from funczero.optim import _foreach

SHAPES = {"w1": (9, 5), "b1": (5,), "w2": (2, 3, 4), "t": ()}


def _problem(dtype: torch.dtype, steps: int, seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
    grads = [
        {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]
    return params, grads


def _sched(count: torch.Tensor) -> torch.Tensor:
    return 1e-2 / (1.0 + count.to(torch.float32))


def _b1_sched(count: torch.Tensor) -> torch.Tensor:
    return 0.85 + 0.05 * torch.cos(count.to(torch.float32))


OPTIMIZERS: dict[str, Callable[[], optim.Optimizer]] = {
    "adam": lambda: optim.adam(1e-2, weight_decay=0.1),
    "adam_sched_lr": lambda: optim.adam(_sched),
    "adam_sched_b1": lambda: optim.adam(1e-2, _b1_sched),
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.1),
    "adamw_sched_lr": lambda: optim.adamw(_sched, weight_decay=0.1),
    "adamw_tensor_lr": lambda: optim.adamw(torch.tensor(1e-2)),
    "sgd": lambda: optim.sgd(0.1, weight_decay=0.01),
    "sgd_momentum_sched": lambda: optim.sgd(_sched, 0.9, nesterov=True),
    "sgd_dampening": lambda: optim.sgd(0.1, 0.9, dampening=0.5),
    "adagrad": lambda: optim.adagrad(0.1, lr_decay=0.01, weight_decay=0.1),
    "adagrad_sched": lambda: optim.adagrad(_sched, initial_accumulator_value=0.1),
    "lion": lambda: optim.lion(1e-3, weight_decay=0.5),
    "lion_sched_b1": lambda: optim.lion(_sched, _b1_sched),
    "lamb": lambda: optim.lamb(1e-2, weight_decay=0.01),
    "lamb_no_bias_correction": lambda: optim.lamb(1e-2, bias_correction=False, max_coeff=2.0),
}


def _pure(opt: optim.Optimizer, params: dict, grads: list[dict]) -> tuple[dict, object]:
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def _inplace(opt: optim.Optimizer, params: dict, grads: list[dict]) -> tuple[dict, object]:
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    for g in grads:
        state = opt.update_(g, state, params)
    return params, state


def _assert_trees_close(a: object, b: object, *, rtol: float, atol: float) -> None:
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_inplace_matches_pure_float64(name: str) -> None:
    params, grads = _problem(torch.float64, steps=20)
    opt = OPTIMIZERS[name]()
    p_pure, s_pure = _pure(opt, params, grads)
    p_fast, s_fast = _inplace(opt, params, grads)
    _assert_trees_close(p_fast, p_pure, rtol=1e-12, atol=1e-12)
    _assert_trees_close(s_fast, s_pure, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adagrad", "lion", "lamb"])
def test_inplace_matches_pure_float32(name: str) -> None:
    params, grads = _problem(torch.float32, steps=10, seed=1)
    opt = OPTIMIZERS[name]()
    p_pure, s_pure = _pure(opt, params, grads)
    p_fast, s_fast = _inplace(opt, params, grads)
    _assert_trees_close(p_fast, p_pure, rtol=1e-6, atol=1e-6)
    _assert_trees_close(s_fast, s_pure, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "inf_grads"])
def test_found_inf_leaves_params_and_state_bit_identical(name: str, poison: bool) -> None:
    params, grads = _problem(torch.float32, steps=3, seed=2)
    opt = OPTIMIZERS[name]()
    state = opt.init(params)
    for g in grads[:2]:  # non-trivial moments first
        state = opt.update_(g, state, params, found_inf=torch.tensor(0.0))
    before_p = {k: v.clone() for k, v in params.items()}
    before_s = optree.tree_map(torch.clone, state)
    bad = grads[2]
    if poison:
        bad = {k: torch.full_like(v, float("inf")) for k, v in bad.items()}
        bad["w1"][0, 0] = float("nan")
    new_state = opt.update_(bad, state, params, found_inf=torch.tensor(1.0))
    for k in params:
        assert torch.equal(params[k], before_p[k]), k
    for x, y in zip(optree.tree_leaves(new_state), optree.tree_leaves(before_s)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["adamw", "sgd_dampening", "lamb", "adagrad"])
def test_found_inf_zero_equals_plain_step_and_counts_advance(name: str) -> None:
    params, grads = _problem(torch.float32, steps=2, seed=4)
    opt = OPTIMIZERS[name]()
    p_a = {k: v.clone() for k, v in params.items()}
    p_b = {k: v.clone() for k, v in params.items()}
    s_a, s_b = opt.init(p_a), opt.init(p_b)
    for g in grads:
        s_a = opt.update_(g, s_a, p_a)
        s_b = opt.update_(g, s_b, p_b, found_inf=torch.tensor(0.0))
    # Fused kernels take found_inf themselves (bit-identical); LAMB switches from its foreach
    # path to the generic one when found_inf is given, which agrees to rounding.
    _assert_trees_close(p_a, p_b, rtol=1e-6, atol=1e-7)
    _assert_trees_close(s_a, s_b, rtol=1e-6, atol=1e-7)
    if name != "lamb":
        _assert_trees_close(p_a, p_b, rtol=0, atol=0)


def test_skipped_step_does_not_advance_count_or_schedule() -> None:
    opt = optim.adamw(_sched)
    params, grads = _problem(torch.float32, steps=3)
    state = opt.init(params)
    state = opt.update_(grads[0], state, params)
    lr_before = opt.learning_rate(state)
    state = opt.update_(grads[1], state, params, found_inf=torch.tensor(1.0))
    counts = [s.count for s in state if "count" in s._fields]
    assert counts and all(c.dtype == torch.int64 and int(c) == 1 for c in counts)
    assert torch.equal(opt.learning_rate(state), lr_before)


def test_update_mutates_moments_in_place_and_returns_same_objects() -> None:
    opt = optim.adamw(1e-2)
    params, grads = _problem(torch.float32, steps=1)
    state = opt.init(params)
    mu_ids = {k: id(v) for k, v in state[0].mu.items()}
    p_ids = {k: id(v) for k, v in params.items()}
    mu_w1 = state[0].mu["w1"]
    new_state = opt.update_(grads[0], state, params)
    assert {k: id(v) for k, v in new_state[0].mu.items()} == mu_ids
    assert {k: id(v) for k, v in params.items()} == p_ids
    assert mu_w1.abs().sum() > 0  # the old state's buffer was donated and now holds the update
    assert int(new_state[0].count) == 1 and int(state[0].count) == 0


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(torch, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, name, spy)
    return calls


@pytest.mark.parametrize(
    ("name", "kernel", "fused_expected"),
    [
        ("adam", "_fused_adam_", True),
        ("adamw", "_fused_adamw_", True),
        ("adamw_sched_lr", "_fused_adamw_", True),
        ("adam_sched_b1", "_fused_adam_", False),  # b1 must be a host float for the kernel
        ("sgd", "_fused_sgd_", True),
        ("sgd_momentum_sched", "_fused_sgd_", True),
        ("sgd_dampening", "_fused_sgd_", False),  # first step differs from the kernel's
        ("adagrad", "_fused_adagrad_", True),
        ("adagrad_sched", "_fused_adagrad_", True),
    ],
)
def test_fused_kernel_dispatch_on_cpu(monkeypatch, name: str, kernel: str, fused_expected: bool):
    calls = _count_calls(monkeypatch, kernel)
    opt = OPTIMIZERS[name]()
    params, grads = _problem(torch.float32, steps=1)
    opt.update_(grads[0], opt.init(params), params)
    assert bool(calls) == fused_expected


def test_missing_fused_kernel_falls_back_to_foreach_and_generic_paths(monkeypatch) -> None:
    params, grads = _problem(torch.float64, steps=5)
    expected, _ = _pure(optim.adamw(1e-2), params, grads)
    monkeypatch.delattr(torch, "_fused_adamw_")  # as on a torch without the op
    got, _ = _inplace(optim.adamw(1e-2), params, grads)
    _assert_trees_close(got, expected, rtol=1e-12, atol=1e-12)
    opt = optim.adamw(1e-2)
    p = {k: v.clone() for k, v in params.items()}
    state = opt.init(p)
    for g in grads:
        state = opt.update_(g, state, p, found_inf=torch.tensor(0.0))
    _assert_trees_close(p, expected, rtol=0, atol=0)  # the generic path is bit-identical


def test_bf16_params_keep_fp32_moments_and_take_the_foreach_path() -> None:
    params, grads = _problem(torch.float32, steps=3)
    params = {k: v.to(torch.bfloat16) for k, v in params.items()}
    opt = optim.adamw(1e-2)
    p_pure, s_pure = _pure(opt, params, grads)
    p_fast, s_fast = _inplace(opt, params, grads)
    assert all(v.dtype == torch.bfloat16 for v in p_fast.values())
    assert all(v.dtype == torch.float32 for v in s_fast[0].mu.values())
    _assert_trees_close(p_fast, p_pure, rtol=8e-3, atol=1e-3)  # at most one bf16 rounding step
    _assert_trees_close(s_fast, s_pure, rtol=1e-6, atol=1e-7)


def test_non_contiguous_params_are_updated_correctly() -> None:
    params, grads = _problem(torch.float64, steps=3)
    params["w1"] = params["w1"].t().contiguous().t()  # same values, transposed strides
    grads = [{**g, "w1": g["w1"].t().contiguous().t()} for g in grads]
    opt = optim.adamw(1e-2)
    p_pure, _ = _pure(opt, params, grads)
    p_fast, _ = _inplace(opt, params, grads)
    _assert_trees_close(p_fast, p_pure, rtol=1e-12, atol=1e-12)


def test_learning_rate_reports_the_rate_of_the_next_update() -> None:
    params, grads = _problem(torch.float32, steps=2)
    for opt, first, second in [
        (optim.adamw(3e-4), 3e-4, 3e-4),
        (optim.adamw(_sched), 1e-2, 5e-3),
        (optim.adagrad(0.1, lr_decay=1.0), 0.1, 0.05),
    ]:
        state = opt.init(params)
        lr = opt.learning_rate(state)
        assert lr.dtype == torch.float32 and lr.ndim == 0
        torch.testing.assert_close(lr, torch.tensor(first))
        state = opt.update_(grads[0], state, params)
        torch.testing.assert_close(opt.learning_rate(state), torch.tensor(second))


def test_inplace_update_wraps_any_chain() -> None:
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2))
    params, grads = _problem(torch.float64, steps=4)
    expected, s_expected = _pure(optim.Optimizer(tx.init, tx.update, None, None), params, grads)
    update_ = optim.inplace_update(tx)
    p = {k: v.clone() for k, v in params.items()}
    s = tx.init(p)
    for g in grads:
        s = update_(g, s, p)
    _assert_trees_close(p, expected, rtol=0, atol=0)
    _assert_trees_close(s, s_expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "path"),
    [("lion", "lion_step_"), ("lion_sched_b1", "lion_step_"), ("lamb", "adam_step_"),
     ("lamb_no_bias_correction", "adam_step_"), ("adam_sched_b1", "adam_step_")],
)  # fmt: skip
def test_foreach_paths_run_in_place_and_match_pure(monkeypatch, name, path) -> None:
    calls = []
    real = getattr(_foreach, path)
    monkeypatch.setattr(_foreach, path, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    params, grads = _problem(torch.float32, steps=4, seed=5)
    p_pure, s_pure = _pure(OPTIMIZERS[name](), params, grads)
    p_fast, s_fast = _inplace(OPTIMIZERS[name](), params, grads)
    assert len(calls) == len(grads)
    _assert_trees_close(p_fast, p_pure, rtol=1e-6, atol=1e-7)
    _assert_trees_close(s_fast, s_pure, rtol=1e-6, atol=1e-7)
