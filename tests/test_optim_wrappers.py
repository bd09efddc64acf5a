"""MultiSteps and apply_if_finite: references by hand, pure == in place, skips, counters, shards.

References: ``MultiSteps(inner, k)`` over ``k`` updates equals one ``inner`` update on the mean
gradient (computed as the same sum divided by ``k``: bit for bit on CPU); ``apply_if_finite``
equals ``inner`` on finite updates and leaves everything untouched on the others. In-place paths
are compared with the pure ones bit for bit where the inner transform is exact in place (scale,
clip) and to 1e-12 in float64 where an alias's fused kernel runs.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optree
import pytest
import torch
from conftest import shard_tree, thread_all_reduce

from funczero import optim

SHAPES = {"wte.weight": (7, 3), "h.0.fc.weight": (4, 3), "h.0.fc.bias": (4,), "scale": ()}


def _problem(dtype: torch.dtype, steps: int, seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    params = {
        k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()
    }
    grads = [
        {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]
    return params, grads


def _clone(tree: dict) -> dict:
    return {k: v.clone() for k, v in tree.items()}


def _pure(tx: Any, params: dict, grads: list[dict]) -> tuple[dict, Any]:
    params = _clone(params)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def _in_place(tx: Any, params: dict, grads: list[dict], **kw: Any) -> tuple[dict, Any]:
    params = _clone(params)
    state = tx.init(params)
    for g in grads:
        state = tx.update_(_clone(g), state, params, **kw)  # the gradients are donated
    return params, state


def _assert_equal(a: object, b: object) -> None:
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):  # bit for bit, nan included
        assert x.dtype == y.dtype
        assert torch.equal(
            x.view(-1).view(torch.uint8) if x.is_floating_point() else x,
            y.view(-1).view(torch.uint8) if y.is_floating_point() else y,
        )


def _assert_close(a: object, b: object, tol: float) -> None:
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _means(grads: list[dict], k: int) -> list[dict]:
    """The mean of every ``k`` consecutive gradients, summed in order from zero, then / k."""
    out = []
    for start in range(0, len(grads), k):
        acc = {n: torch.zeros_like(g, dtype=torch.promote_types(g.dtype, torch.float32))
               for n, g in grads[0].items()}  # fmt: skip
        for g in grads[start : start + k]:
            acc = {n: acc[n] + g[n].to(acc[n].dtype) for n in acc}
        out.append({n: (a / k).to(grads[0][n].dtype) for n, a in acc.items()})
    return out


# --------------------------------------------------------------------------- MultiSteps


INNER: dict[str, Callable[[], optim.GradientTransformation]] = {
    "adamw": lambda: optim.adamw(optim.linear_schedule(1e-2, 1e-3, 10), weight_decay=0.1),
    "clip_adamw": lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2)),
    "sgd_momentum": lambda: optim.sgd(0.1, 0.9, nesterov=True),
    "lion": lambda: optim.lion(1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(INNER))
def test_multisteps_over_k_updates_is_one_step_on_the_mean_gradient(name: str, k: int) -> None:
    params, grads = _problem(torch.float64, steps=3 * k)
    expected, inner_state = _pure(INNER[name](), params, _means(grads, k))
    got, state = _pure(optim.MultiSteps(INNER[name](), k), params, grads)
    _assert_equal(got, expected)  # the same sums and division: bit for bit
    _assert_equal(state.inner_opt_state, inner_state)
    assert state.mini_step.item() == 0 and state.gradient_step.item() == 3
    assert state.mini_step.dtype == state.gradient_step.dtype == torch.int64


@pytest.mark.parametrize("name", list(INNER))
def test_multisteps_in_place_equals_the_inner_in_place_step_on_the_mean(name: str) -> None:
    params, grads = _problem(torch.float32, steps=6)
    # The wrapper always hands the inner step a found_inf tensor (0 on the k-th update).
    expected, inner_state = _in_place(
        INNER[name](), params, _means(grads, 3), found_inf=torch.tensor(0.0)
    )
    got, state = _in_place(optim.MultiSteps(INNER[name](), 3), params, grads)
    _assert_equal(got, expected)
    _assert_equal(state.inner_opt_state, inner_state)


@pytest.mark.parametrize("name", list(INNER))
def test_multisteps_in_place_matches_pure_float64(name: str) -> None:
    params, grads = _problem(torch.float64, steps=7)  # ends mid-cycle: the accumulator is live
    tx = optim.MultiSteps(INNER[name](), 3)
    _assert_close(_in_place(tx, params, grads), _pure(tx, params, grads), 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multisteps_transform_in_place_is_bit_for_bit_the_pure_update(dtype) -> None:
    params, grads = _problem(dtype, steps=5)
    tx = optim.MultiSteps(optim.chain(optim.clip_by_global_norm(0.5), optim.scale(-0.1)), 2)
    assert tx.transform_ is not None
    pure_state = state = tx.init(params)
    for g in grads:
        expected, pure_state = tx.update(g, pure_state, params)
        g = _clone(g)
        state = tx.transform_(g, state, params)
        _assert_equal((g, state), (expected, pure_state))
    _assert_equal(_in_place(tx, params, grads), _pure(tx, params, grads))


def test_multisteps_updates_are_zero_until_the_kth_and_the_schedule_advances_once_per_k() -> None:
    params, grads = _problem(torch.float32, steps=4)
    lr = optim.linear_schedule(1.0, 0.0, 4)
    tx = optim.MultiSteps(optim.sgd(lr), 2)
    state = tx.init(params)
    rates = []
    for i, g in enumerate(grads):
        rates.append(tx.learning_rate(state).item())
        updates, state = tx.update(g, state, params)
        assert all(bool((u == 0).all()) for u in updates.values()) == (i % 2 == 0)
    assert rates == [1.0, 1.0, 0.75, 0.75]
    assert [int(x) for x in (state.mini_step, state.gradient_step)] == [0, 2]


def test_multisteps_skipped_update_neither_accumulates_nor_counts() -> None:
    params, grads = _problem(torch.float32, steps=3)
    tx = optim.MultiSteps(optim.adamw(1e-2), 2)
    state = tx.update_(_clone(grads[0]), tx.init(params), params)
    before = (_clone(params), optree.tree_map(torch.clone, state))
    bad = {k: torch.full_like(v, float("inf")) for k, v in grads[1].items()}
    state = tx.update_(bad, state, params, found_inf=torch.tensor(1.0))
    _assert_equal((params, state), before)
    # the skipped update did not count: the next one completes the pair with grads[0]
    state = tx.update_(_clone(grads[2]), state, params)
    expected, _ = _in_place(optim.adamw(1e-2), before[0], _means([grads[0], grads[2]], 2),
                            found_inf=torch.tensor(0.0))  # fmt: skip
    _assert_equal(params, expected)
    assert int(state.gradient_step) == 1


def test_multisteps_state_is_tensors_keyed_like_the_parameters() -> None:
    params, _ = _problem(torch.bfloat16, steps=0)
    state = optim.MultiSteps(optim.adamw(1e-3), 4).init(params)
    paths = optree.tree_paths(state)
    assert all(isinstance(x, torch.Tensor) for x in optree.tree_leaves(state))
    assert state.acc_grads.keys() == params.keys()
    assert all(a.dtype == torch.float32 for a in state.acc_grads.values())  # at least fp32
    assert len(paths) == 2 + len(optree.tree_leaves(optim.adamw(1e-3).init(params))) + len(params)


@pytest.mark.parametrize("every_k", [0, -1, 2.0, True])
def test_multisteps_rejects_a_bad_every_k(every_k) -> None:
    with pytest.raises(ValueError, match=rf"every_k={every_k!r} must be an int >= 1"):
        optim.MultiSteps(optim.sgd(0.1), every_k)


# --------------------------------------------------------------------------- apply_if_finite


def _with_bad(grads: list[dict], bad_steps: set[int]) -> list[dict]:
    out = []
    for i, g in enumerate(grads):
        g = _clone(g)
        if i in bad_steps:
            g["h.0.fc.bias"][1] = float("nan") if i % 2 else float("inf")
        out.append(g)
    return out


@pytest.mark.parametrize("path", ["pure", "in_place"])
def test_apply_if_finite_skips_non_finite_updates_and_counts_them(path: str) -> None:
    params, grads = _problem(torch.float64, steps=6)
    bad = _with_bad(grads, {1, 3, 4})
    run = _pure if path == "pure" else _in_place
    got, state = run(
        optim.apply_if_finite(optim.adamw(1e-2), max_consecutive_errors=5), params, bad
    )
    finite_only = [g for i, g in enumerate(grads) if i not in {1, 3, 4}]
    expected, inner_state = run(optim.adamw(1e-2), params, finite_only)
    _assert_close((got, state.inner_state), (expected, inner_state), 0.0)
    assert [int(state.notfinite_count), bool(state.last_finite), int(state.total_notfinite)] == [
        0, True, 3,
    ]  # fmt: skip


def test_apply_if_finite_counts_consecutive_errors_and_applies_past_the_limit() -> None:
    params, grads = _problem(torch.float32, steps=4)
    tx = optim.apply_if_finite(optim.sgd(0.1), max_consecutive_errors=2)
    state = tx.init(params)
    bad = _with_bad(grads, {0, 1, 2, 3})
    counts = []
    for g in bad:
        state = tx.update_(g, state, params)
        counts.append((int(state.notfinite_count), bool(state.last_finite)))
    assert counts == [(1, False), (2, False), (3, False), (4, False)]
    assert int(state.total_notfinite) == 4
    assert torch.isnan(params["h.0.fc.bias"]).any() or torch.isinf(params["h.0.fc.bias"]).any()
    never = optim.apply_if_finite(optim.sgd(0.1), max_consecutive_errors=None)
    p = _clone(_problem(torch.float32, steps=0)[0])
    kept = _clone(p)
    state = never.init(p)
    for g in _with_bad(grads, {0, 1, 2, 3}):
        state = never.update_(g, state, p)
    _assert_equal(p, kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_if_finite_in_place_is_bit_for_bit_the_pure_update(dtype) -> None:
    params, grads = _problem(dtype, steps=5)
    bad = _with_bad(grads, {1, 2})
    tx = optim.apply_if_finite(
        optim.chain(optim.clip_by_global_norm(0.5), optim.scale(-0.1)), max_consecutive_errors=1
    )
    pure_state = state = tx.init(params)
    for g in bad:
        expected, pure_state = tx.update(g, pure_state, params)
        g = _clone(g)
        state = tx.transform_(g, state, params)
        _assert_equal(state, pure_state)
        _assert_equal(g, expected)  # zeros where skipped, nan where applied past the limit
    _assert_equal(_in_place(tx, params, bad), _pure(tx, params, bad))


def test_apply_if_finite_leaves_its_counters_when_the_caller_skips() -> None:
    params, grads = _problem(torch.float32, steps=1)
    tx = optim.apply_if_finite(optim.adamw(1e-2), max_consecutive_errors=3)
    state = tx.init(params)
    before = (_clone(params), optree.tree_map(torch.clone, state))
    state = tx.update_(_with_bad(grads, {0})[0], state, params, found_inf=torch.tensor(1.0))
    _assert_equal((params, state), before)


def test_wrappers_keep_the_fused_path_inside_chains_and_never_sync_with_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.apply_if_finite(optim.MultiSteps(optim.adamw(optim.cosine_decay_schedule(1e-2, 10)),
                                               2), 3),
    )  # fmt: skip
    assert optim.in_place_unsupported_reason(opt) is None and opt.transform_ is None
    params, grads = _problem(torch.float32, steps=4)
    state = opt.init(params)

    def sync(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an optimizer read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for g in _with_bad(grads, {1}):
        state = opt.update_(g, state, params, found_inf=torch.tensor(0.0))
        _, _ = opt.update(g, state, params)
        opt.learning_rate(state)


def test_wrapper_names_the_member_without_an_in_place_step() -> None:
    assert optim.in_place_unsupported_reason(optim.MultiSteps(optim.scale_by_adam(), 2)) == (
        "MultiSteps, member 0 (scale_by_adam) has neither update_ nor transform_ (it only has "
        "the pure update)"
    )
    tx = optim.chain(optim.apply_if_finite(optim.scale_by_rss(), 1), optim.sgd(0.1))
    assert optim.in_place_unsupported_reason(tx) == (
        "chain member 0 (apply_if_finite), member 0 (scale_by_rss) has no in-place transform_ "
        "(it only has the pure update)"
    )


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_apply_if_finite_rejects_a_bad_limit(bad) -> None:
    with pytest.raises(ValueError, match=r"max_consecutive_errors=.* must be an int >= 0"):
        optim.apply_if_finite(optim.sgd(0.1), bad)


# --------------------------------------------------------------------------- ZeRO shards

WORLD = 2


def _shard(tree: dict, rank: int) -> dict:
    return shard_tree(tree, rank, WORLD)


def _barrier_all_reduce() -> Callable[[int], Callable[[torch.Tensor], torch.Tensor]]:
    return thread_all_reduce(WORLD)


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "in_place"])
def test_a_non_finite_value_on_one_shard_skips_the_step_on_every_rank(inplace: bool) -> None:
    params, grads = _problem(torch.float64, steps=4)
    bad = _with_bad(grads, {2})  # element 1 of the bias: only rank 0's shard holds it
    make = lambda: optim.apply_if_finite(
        optim.MultiSteps(optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2)), 2), 2
    )
    expected, _ = _pure(make(), params, bad)
    reducers = _barrier_all_reduce()

    def rank_main(rank: int) -> tuple[dict, Any]:
        opt, p = make(), _shard(params, rank)
        state = opt.init(p)
        for g in bad:
            g = _shard(g, rank)
            if inplace:
                state = opt.update_(g, state, p, reduce_fn=reducers(rank))
            else:
                updates, state = opt.update(g, state, p, reduce_fn=reducers(rank))
                p = optim.apply_updates(p, updates)
        return p, state

    with ThreadPoolExecutor(WORLD) as pool:
        (p0, s0), (p1, s1) = pool.map(rank_main, range(WORLD))
    for s in (s0, s1):
        assert int(s.total_notfinite) == 1 and int(s.inner_state.gradient_step) == 1
    for k, v in expected.items():
        flat = torch.cat([p0[k], p1[k]])[: v.numel()].reshape(v.shape)
        torch.testing.assert_close(flat, v, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the training step


def _train_gpt(opt: optim.GradientTransformation, donate: bool) -> tuple[dict, Any]:
    import warnings

    import funczero
    from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
    from funczero.train.evaluation import full_state_dict

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, seq_len=8, d_model=16, n_layers=1, n_heads=2))
    config = {"train_micro_batch_size_per_gpu": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot update in place" warning
        run = funczero.initialize(
            model, config, lambda m, b: cross_entropy_loss(m, b[:2]) * b[2], optimizer=opt,
            donate=donate, device="cpu",
        )  # fmt: skip
        state = run.state
        for step in range(4):
            ids = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(step))
            scale = torch.tensor(float("inf") if step == 2 else 1.0)  # inf gradients: skipped
            state, _ = run.train_step(state, (ids[:, :-1], ids[:, 1:], scale))
    assert int(state.skipped) == 1
    return {k: v.clone() for k, v in full_state_dict(run.plan, state).items()}, state


def test_the_training_step_runs_the_wrappers_in_place_and_agrees_with_the_pure_path() -> None:
    make = lambda: optim.apply_if_finite(
        optim.MultiSteps(optim.adamw(1e-2, weight_decay=0.1), 2), 3
    )
    in_place, state = _train_gpt(make(), donate=True)
    pure, pure_state = _train_gpt(make(), donate=False)
    for k in in_place:
        torch.testing.assert_close(in_place[k], pure[k], rtol=1e-6, atol=1e-6, msg=k)
    # 4 steps, one skipped: 3 accumulated gradients, so one AdamW step and one pending gradient
    for s in (state.opt_state, pure_state.opt_state):
        assert [int(s.inner_state.mini_step), int(s.inner_state.gradient_step)] == [1, 1]
        assert int(s.total_notfinite) == 0  # the skipped step changed no counter
