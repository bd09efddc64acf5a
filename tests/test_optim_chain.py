"""chain keeps the in-place path of its members; in_place_unsupported_reason names the one that breaks it."""

from __future__ import annotations

import optree
import pytest
import torch

from funczero import optim

SHAPES = {"w1": (9, 5), "b1": (5,), "w2": (2, 3, 4), "t": ()}


def _problem(dtype: torch.dtype, steps: int, seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    params = {
        k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()
    }
    grads = [
        {
            k: 3 * torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)
            for k, s in SHAPES.items()
        }
        for _ in range(steps)
    ]  # norms ~20: clipping at 1.0 is active every step
    return params, grads


def _clone(tree: dict) -> dict:
    return {k: v.clone() for k, v in tree.items()}


def _pure(tx: optim.GradientTransformation, params: dict, grads: list[dict]) -> tuple[dict, object]:
    params = _clone(params)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def _in_place(tx: optim.GradientTransformation, params: dict, grads: list[dict], **kw) -> tuple:
    params = _clone(params)
    state = tx.init(params)
    for g in grads:
        state = tx.update_(_clone(g), state, params, **kw)  # update_ may overwrite the gradients
    return params, state


def _assert_equal(a: object, b: object) -> None:
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and torch.equal(x, y)


def _assert_close(a: object, b: object, tol: float) -> None:
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_clip_then_adamw_has_the_in_place_step_and_learning_rate() -> None:
    opt = optim.chain(
        optim.clip_by_global_norm(1.0), optim.adamw(optim.linear_schedule(1e-2, 0.0, 10))
    )
    assert optim.supports_in_place(opt) and optim.in_place_unsupported_reason(opt) is None
    params, grads = _problem(torch.float32, steps=3)
    state = opt.init(params)
    torch.testing.assert_close(opt.learning_rate(state), torch.tensor(1e-2))
    state = opt.update_(_clone(grads[0]), state, params)
    torch.testing.assert_close(opt.learning_rate(state), torch.tensor(9e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_then_adamw_in_place_is_clipping_then_the_fused_kernel_bit_for_bit(dtype) -> None:
    params, grads = _problem(dtype, steps=5)
    clip, adamw = optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1)
    got = _in_place(optim.chain(clip, adamw), params, grads)
    # The reference runs the two members by hand: the pure clip, then AdamW's fused update_.
    p = _clone(params)
    s = adamw.init(p)
    for g in grads:
        s = adamw.update_(clip.update(g, clip.init(p))[0], s, p)
    _assert_equal(got, (p, (optim.EmptyState(), s)))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_clip_then_adamw_in_place_matches_the_pure_chain(dtype, tol: float) -> None:
    params, grads = _problem(dtype, steps=10)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    # The fused AdamW kernel rounds differently from the pure ops: equal to rounding only.
    _assert_close(_in_place(tx, params, grads), _pure(tx, params, grads), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_chain_of_transforms_in_place_equals_pure_bit_for_bit(dtype) -> None:
    params, grads = _problem(dtype, steps=4, seed=1)
    sched = optim.linear_schedule(0.1, 0.01, 4)
    tx = optim.chain(optim.clip_by_global_norm(2.0), optim.scale(0.5), optim.identity(),
                     optim.scale_by_learning_rate(sched))  # fmt: skip
    assert tx.transform_ is not None
    _assert_equal(_in_place(tx, params, grads), _pure(tx, params, grads))


def test_skipped_step_leaves_params_and_state_of_every_member_untouched() -> None:
    params, grads = _problem(torch.float32, steps=3, seed=2)
    for tx in [
        optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2)),
        optim.chain(
            optim.clip_by_global_norm(1.0), optim.scale_by_learning_rate(lambda c: 0.1 / (1.0 + c))
        ),
    ]:
        p = _clone(params)
        state = tx.init(p)
        state = tx.update_(_clone(grads[0]), state, p, found_inf=torch.tensor(0.0))
        before = optree.tree_map(torch.clone, (p, state))
        bad = {k: torch.full_like(v, float("inf")) for k, v in grads[1].items()}
        state = tx.update_(bad, state, p, found_inf=torch.tensor(1.0))
        _assert_equal((p, state), before)
        state = tx.update_(_clone(grads[2]), state, p, found_inf=torch.tensor(0.0))
        counts = [x for x in optree.tree_leaves(state) if x.dtype == torch.int64]
        assert counts and all(int(c) == 2 for c in counts)


def test_the_train_steps_call_works_on_a_chain_and_reduce_fn_reaches_the_clip() -> None:
    params, grads = _problem(torch.float32, steps=1)
    calls = []

    def reduce_fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x

    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.lamb(1e-2))
    found_inf = torch.tensor(False)
    opt.update_(
        _clone(grads[0]), opt.init(params), params, found_inf=found_inf.float(), reduce_fn=reduce_fn
    )
    opt.update(grads[0], opt.init(params), params, reduce_fn=reduce_fn)
    # Each of the two calls reduces once for the clip's norm and once for LAMB's trust ratios.
    assert len(calls) == 4


def test_a_chain_ending_in_transforms_adds_the_updates_in_place() -> None:
    params = {"w": torch.zeros(2), "h": torch.zeros(2, dtype=torch.bfloat16)}
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.scale(-0.5))
    tx.update_({"w": torch.tensor([3.0, 4.0]), "h": torch.zeros(2)}, tx.init(params), params)
    torch.testing.assert_close(params["w"], torch.tensor([-0.3, -0.4]))
    assert params["h"].dtype == torch.bfloat16
    empty = optim.chain()
    p = {"w": torch.ones(1)}
    assert empty.update_({"w": torch.ones(1)}, empty.init(p), p) == ()
    assert torch.equal(p["w"], torch.tensor([2.0]))


def test_nested_chains_keep_the_in_place_path() -> None:
    inner = optim.chain(optim.clip_by_global_norm(1.0), optim.scale(2.0))
    tx = optim.chain(inner, optim.sgd(0.1, 0.9))
    assert optim.supports_in_place(tx)
    params, grads = _problem(torch.float64, steps=3)
    _assert_close(_in_place(tx, params, grads), _pure(tx, params, grads), 1e-14)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.scale_by_adam(), optim.scale(-0.1)),
         "chain member 1 (scale_by_adam) has no in-place transform_ (it only has the pure update)"),
        (lambda: optim.chain(optim.adamw(1e-3), optim.clip_by_global_norm(1.0)),
         ("chain member 0 (adamw) steps the parameters itself (update_), so it must be the last "
          "member")),
        (lambda: optim.chain(optim.scale(1.0), optim.stateless(lambda u, p: u)),
         ("chain member 1 (stateless), the last, has neither update_ nor transform_ (it only has "
          "the pure update)")),
        (lambda: optim.chain(optim.chain(optim.scale(1.0), optim.scale_by_rss()), optim.sgd(0.1)),
         ("chain member 0, member 1 (scale_by_rss) has no in-place transform_ (it only has the "
          "pure update)")),
        (lambda: optim.chain(optim.scale(1.0), optim.chain(optim.scale(1.0), optim.trace(0.9))),
         ("chain member 1, member 1 (trace), the last, has neither update_ nor transform_ (it "
          "only has the pure update)")),
        (lambda: optim.scale_by_lion(),
         "scale_by_lion has no in-place update_ (it only has the pure update)"),
    ],
)  # fmt: skip
def test_unsupported_reason_names_the_member(build, reason: str) -> None:
    tx = build()
    assert not optim.supports_in_place(tx)
    assert optim.in_place_unsupported_reason(tx) == reason


def test_every_alias_supports_in_place_and_names_itself() -> None:
    for name in ["sgd", "adam", "adamw", "lion", "lamb", "adagrad"]:
        opt = getattr(optim, name)(1e-3)
        assert optim.supports_in_place(opt) and opt.learning_rate is not None
        tx = optim.chain(opt, optim.scale(1.0))
        assert f"member 0 ({name}) steps the parameters" in optim.in_place_unsupported_reason(tx)


def test_optimizer_is_the_one_contract() -> None:
    assert optim.Optimizer is optim.GradientTransformation
    tx = optim.chain(optim.scale(1.0))
    legacy = optim.Optimizer(tx.init, tx.update, None, None)  # positional, as before
    assert legacy.transform_ is None and legacy.members == ()
    assert not optim.supports_in_place(legacy)
    assert optim.adamw(1e-3)._replace(update_=None).update_ is None


@pytest.mark.parametrize(
    ("build", "exact"),
    [
        (lambda: optim.identity(), True),
        (lambda: optim.scale(0.3), True),
        (lambda: optim.scale(torch.tensor(0.3)), True),
        (lambda: optim.scale_by_learning_rate(optim.cosine_decay_schedule(0.1, 5)), True),
        (lambda: optim.add_decayed_weights(torch.tensor(0.1)), True),
        (lambda: optim.add_decayed_weights(0.1), False),  # one fused multiply-add per element
        (lambda: optim.clip_by_global_norm(1.0), True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_in_place_agrees_with_update(build, exact: bool, dtype) -> None:
    params, grads = _problem(dtype, steps=3, seed=4)
    tx = build()
    pure_state = state = tx.init(params)
    for g in grads:
        expected, pure_state = tx.update(g, pure_state, params)
        g = _clone(g)
        state = tx.transform_(g, state, params)
        if exact:
            _assert_equal((g, state), (expected, pure_state))
        else:
            _assert_close(
                (g, state), (expected, pure_state), 1e-6 if dtype == torch.float32 else 1e-2
            )
