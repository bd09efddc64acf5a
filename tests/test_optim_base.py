"""The transform contract: chain, purity, state layout, dtypes, validation, public API."""

from __future__ import annotations

import inspect

import optree
import pytest
import torch

from funczero import optim


def _params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "blocks.0.attn.qkv.weight": torch.randn(6, 2, generator=gen).to(dtype),
        "blocks.0.attn.qkv.bias": torch.randn(6, generator=gen).to(dtype),
        "logit_scale": torch.randn((), generator=gen).to(dtype),  # 0-d: no dtype promotion
    }


def test_public_api_is_pinned() -> None:
    assert sorted(optim.__all__) == sorted(
        [
            "EmptyState", "GradientTransformation", "InPlaceUpdateFn", "OptState", "Optimizer",
            "Params", "ReduceFn", "ScalarOrSchedule", "Schedule", "Updates", "apply_updates",
            "chain", "identity", "inplace_update", "stateless", "adagrad", "adam", "adamw",
            "lamb", "lion", "sgd", "DampedTraceState", "ScaleByAdamState", "ScaleByLionState",
            "ScaleByRssState", "ScaleByScheduleState", "TraceState", "add_decayed_weights",
            "clip_by_global_norm", "global_norm", "scale", "scale_by_adam",
            "scale_by_learning_rate", "scale_by_lion", "scale_by_rss", "scale_by_schedule",
            "scale_by_trust_ratio", "trace", "constant_schedule", "cosine_decay_schedule",
            "from_deepspeed", "join_schedules", "linear_schedule", "lr_range_test", "one_cycle",
            "warmup_cosine_decay_schedule", "warmup_cosine_lr", "warmup_decay_lr", "warmup_lr",
            "InPlaceTransformFn", "supports_in_place", "in_place_unsupported_reason",
            "CLIP_NORM_EPS", "clip_coefficient", "WeightDecayMask",
            "no_decay_for_norms_and_biases", "ParamMask", "ParamLabels", "masked", "MaskedState",
            "partition", "PartitionState", "set_to_zero", "MultiSteps", "MultiStepsState",
            "apply_if_finite", "ApplyIfFiniteState", "all_finite",
        ]
    )  # fmt: skip
    for name in optim.__all__:
        assert getattr(optim, name) is not None


@pytest.mark.parametrize(
    ("fn", "signature"),
    [
        (optim.sgd, ("(learning_rate, momentum=0.0, *, dampening=0.0, nesterov=False, "
                     "weight_decay=0.0, mask=None, shapes=None)")),
        (optim.adam, ("(learning_rate, b1=0.9, b2=0.999, eps=1e-08, *, weight_decay=0.0, "
                      "mask=None, shapes=None)")),
        (optim.adamw, ("(learning_rate, b1=0.9, b2=0.999, eps=1e-08, *, weight_decay=0.01, "
                       "mask=None, shapes=None)")),
        (optim.lion, "(learning_rate, b1=0.9, b2=0.99, *, weight_decay=0.0, mask=None, shapes=None)"),
        (optim.lamb, ("(learning_rate, b1=0.9, b2=0.999, eps=1e-06, *, weight_decay=0.0, "
                      "bias_correction=True, max_coeff=10.0, min_coeff=0.01, mask=None, "
                      "shapes=None)")),
        (optim.adagrad, ("(learning_rate, *, lr_decay=0.0, initial_accumulator_value=0.0, "
                         "eps=1e-10, weight_decay=0.0, mask=None, shapes=None)")),
    ],
)  # fmt: skip
def test_alias_signatures_are_the_contract(fn, signature: str) -> None:
    sig = inspect.signature(fn)
    plain = sig.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    assert str(plain) == signature


def test_chain_equals_applying_members_in_sequence() -> None:
    params = _params()
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    members = [optim.clip_by_global_norm(1.0), optim.scale_by_adam(), optim.scale(-0.1)]
    tx = optim.chain(*members)
    state = tx.init(params)
    states = [m.init(params) for m in members]
    for _ in range(3):
        out, state = tx.update(grads, state, params)
        manual = grads
        for i, m in enumerate(members):
            manual, states[i] = m.update(manual, states[i], params)
        for k in out:
            assert torch.equal(out[k], manual[k])
    assert len(state) == 3


def test_chain_rejects_non_transforms_and_foreign_state() -> None:
    with pytest.raises(TypeError, match="argument 1 is float"):
        optim.chain(optim.identity(), 0.1)
    tx = optim.chain(optim.identity(), optim.identity())
    with pytest.raises(ValueError, match="different optimizer"):
        tx.update({}, (optim.EmptyState(),))


def test_state_layout_and_leaf_paths() -> None:
    params = _params()
    state = optim.adamw(1e-3).init(params)
    # optree's plain paths number NamedTuple fields; accessors carry the field names.
    paths = [
        "/".join(str(getattr(e, "field", getattr(e, "key", getattr(e, "index", None)))) for e in a)
        for a in optree.tree_accessors(state)
    ]
    assert paths == [
        "0/count",
        "0/mu/blocks.0.attn.qkv.bias",
        "0/mu/blocks.0.attn.qkv.weight",
        "0/mu/logit_scale",
        "0/nu/blocks.0.attn.qkv.bias",
        "0/nu/blocks.0.attn.qkv.weight",
        "0/nu/logit_scale",
    ]
    assert isinstance(state[0], optim.ScaleByAdamState)
    assert state[0].count.dtype == torch.int64 and state[0].count.ndim == 0
    assert all(isinstance(leaf, torch.Tensor) for leaf in optree.tree_leaves(state))
    assert optim.sgd(0.1, 0.9).init(params)[1].trace.keys() == params.keys()


def test_update_is_pure() -> None:
    params = _params()
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    for opt in [optim.adamw(1e-2), optim.lamb(1e-2), optim.sgd(0.1, 0.9, dampening=0.1),
                optim.lion(1e-3), optim.adagrad(0.1)]:  # fmt: skip
        state = opt.init(params)
        state = opt.update(grads, state, params)[1]  # non-zero moments
        snapshot = optree.tree_map(torch.clone, (params, grads, state))
        opt.update(grads, state, params)
        for a, b in zip(optree.tree_leaves((params, grads, state)), optree.tree_leaves(snapshot)):
            assert torch.equal(a, b)


def test_apply_updates_casts_back_and_does_not_mutate() -> None:
    params = _params(torch.bfloat16)
    before = {k: v.clone() for k, v in params.items()}
    updates = {k: torch.full(v.shape, 0.5) for k, v in params.items()}
    out = optim.apply_updates(params, updates)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    assert all(torch.equal(params[k], before[k]) for k in params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_moments_are_at_least_fp32(dtype: torch.dtype) -> None:
    params = _params(dtype)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    for opt in [optim.adamw(1e-3), optim.sgd(0.1, 0.9, dampening=0.1), optim.lion(1e-3),
                optim.adagrad(0.1, lr_decay=0.1), optim.lamb(1e-3)]:  # fmt: skip
        state = opt.init(params)
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        updates, state = opt.update(grads, state, params)
        floats = [x for x in optree.tree_leaves(state) if x.is_floating_point()]
        assert floats and all(x.dtype == expected for x in floats)
        assert all(u.dtype == expected for u in updates.values())


def test_zero_eps_adam_has_no_nan_from_fp16_rounding() -> None:
    # eps lives in fp32 even for fp16 params (optax PR #1755: 1e-8 becomes 0 in fp16).
    params = {"w": torch.zeros(3, dtype=torch.float16)}
    opt = optim.adam(1e-3)
    updates, _ = opt.update({"w": torch.zeros(3, dtype=torch.float16)}, opt.init(params), params)
    assert torch.all(torch.isfinite(updates["w"]))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: optim.adamw(-1.0), r"adamw: learning_rate=-1.0 must be >= 0"),
        (lambda: optim.adam(1e-3, b1=1.0), r"adam: b1=1.0 must be < 1.0"),
        (lambda: optim.adam(1e-3, b2=-0.1), r"adam: b2=-0.1 must be >= 0"),
        (lambda: optim.adamw(1e-3, eps=-1e-8), r"adamw: eps=-1e-08 must be >= 0"),
        (lambda: optim.adamw(1e-3, weight_decay=-0.1), r"weight_decay=-0.1 must be >= 0"),
        (lambda: optim.sgd(0.1, nesterov=True), r"nesterov=True requires momentum > 0"),
        (lambda: optim.sgd(0.1, 0.9, dampening=0.1, nesterov=True), r"zero dampening|== 0"),
        (lambda: optim.sgd(0.1, momentum=-0.5), r"sgd: momentum=-0.5 must be >= 0"),
        (lambda: optim.lamb(1e-3, min_coeff=2.0, max_coeff=1.0), r"max_coeff=1.0 must be >= 2.0"),
        (lambda: optim.adagrad(0.1, lr_decay=-1.0), r"adagrad: lr_decay=-1.0 must be >= 0"),
        (lambda: optim.lion(1e-3, b2=1.5), r"lion: b2=1.5 must be <= 1.0"),
        (lambda: optim.adamw(float("nan")), r"learning_rate=nan"),
        (lambda: optim.adamw(torch.ones(2)), r"floating 0-d tensor"),
        (lambda: optim.adamw("1e-3"), r"must be a Python float"),
        (lambda: optim.clip_by_global_norm(0.0), r"max_norm=0.0 must be > 0"),
    ],
)
def test_build_time_validation_names_the_value(build, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_transforms_needing_params_say_so() -> None:
    tx = optim.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match=r"call update\(updates, state, params\)"):
        tx.update({"w": torch.ones(1)}, tx.init({}))


def test_hyperparameter_tensor_can_change_between_steps() -> None:
    lr = torch.tensor(0.1)
    opt = optim.sgd(lr)
    params = {"w": torch.zeros(1)}
    state = opt.init(params)
    state = opt.update_({"w": torch.ones(1)}, state, params)
    lr.fill_(1.0)
    opt.update_({"w": torch.ones(1)}, state, params)
    torch.testing.assert_close(params["w"], torch.tensor([-1.1]))
    torch.testing.assert_close(opt.learning_rate(state), torch.tensor(1.0))


def test_identity_and_stateless() -> None:
    g = {"w": torch.arange(3.0)}
    assert optim.identity().update(g, optim.identity().init(g))[0] is g
    double = optim.stateless(lambda u, p: {k: 2 * v for k, v in u.items()})
    out, state = double.update(g, double.init(g))
    assert state == optim.EmptyState() and torch.equal(out["w"], 2 * g["w"])


def test_missing_gradient_keys_are_an_error_not_a_silently_shrunk_state() -> None:
    params = _params()
    partial = {"blocks.0.attn.qkv.bias": torch.ones(6)}
    for opt in [optim.adamw(1e-3), optim.sgd(0.1, 0.9), optim.lion(1e-3), optim.adagrad(0.1)]:
        state = opt.init(params)
        with pytest.raises(KeyError, match=r"missing from the updates: \['blocks.0.attn.qkv.w"):
            opt.update(partial, state, params)
        with pytest.raises(KeyError, match=r"zeros for frozen ones"):
            opt.update_(partial, state, params)
