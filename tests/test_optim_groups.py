"""Parameter groups: partition == torch.optim parameter groups, masked, set_to_zero, rules on
global shapes, in place == pure, and ZeRO stage 3 on 2 gloo ranks == stage 0 on one process.

References: ``torch.optim.AdamW`` with two parameter groups (different learning rates and weight
decays), within 1e-6 in float32 and 1e-10 relative in float64; each group's optimizer run alone on
its own parameters, bit for bit. At stage 3 every rank holds 1-D shards, so only rules given the
global shapes (``shapes=``) form the groups that stage 0 forms; the test shows both that they then
give the stage-0 trajectory (1e-5: the reductions sum in another order) and that without the
shapes they do not.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from safetensors.torch import load_file, save_file

from funczero import optim

SHAPES = {"wte.weight": (11, 4), "h.0.fc.weight": (6, 4), "h.0.fc.bias": (6,),
          "h.0.ln.weight": (4,), "logit_scale": ()}  # fmt: skip
MATRICES = ["wte.weight", "h.0.fc.weight"]
VECTORS = ["h.0.fc.bias", "h.0.ln.weight", "logit_scale"]


def by_rank(name: str, shape: torch.Size) -> str:
    return "matrix" if len(shape) >= 2 else "vector"


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


def _subset(tree: dict, keys: list[str]) -> dict:
    return {k: tree[k] for k in keys}


def _run(opt: Any, params: dict, grads: list[dict], path: str) -> tuple[dict, Any]:
    params = _clone(params)
    state = opt.init(params)
    for g in grads:
        if path == "pure":
            updates, state = opt.update(g, state, params)
            params = optim.apply_updates(params, updates)
        elif path == "in_place":
            state = opt.update_(_clone(g), state, params)
        else:  # a step that may be skipped: the kernels take found_inf, the rest the generic path
            state = opt.update_(_clone(g), state, params, found_inf=torch.tensor(0.0))
    return params, state


def _assert_equal(a: object, b: object) -> None:
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and torch.equal(x, y)


def _two_adamw_groups(**kw: Any) -> optim.GradientTransformation:
    return optim.partition(
        {"matrix": optim.adamw(3e-2, b2=0.95, weight_decay=0.1, **kw),
         "vector": optim.adamw(1e-2, b2=0.95, weight_decay=0.0, **kw)},
        by_rank,
    )  # fmt: skip


def _torch_two_groups(params: dict, grads: list[dict], **kwargs: Any) -> dict:
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    groups = [
        {"params": [leaves[k] for k in MATRICES], "lr": 3e-2, "weight_decay": 0.1},
        {"params": [leaves[k] for k in VECTORS], "lr": 1e-2, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), **kwargs)
    for g in grads:
        for k, p in leaves.items():
            p.grad = g[k].clone()
        opt.step()
    return {k: v.detach() for k, v in leaves.items()}


# --------------------------------------------------------------------------- partition


@pytest.mark.parametrize("path", ["pure", "in_place", "skippable"])
def test_partition_matches_torch_adamw_with_two_param_groups_float32(path: str) -> None:
    params, grads = _problem(torch.float32, steps=20)
    expected = _torch_two_groups(params, grads, foreach=False)
    got, _ = _run(_two_adamw_groups(), params, grads, path)
    for k, ref in expected.items():
        torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("path", ["pure", "in_place", "skippable"])
def test_partition_matches_torch_adamw_with_two_param_groups_float64(path: str) -> None:
    params, grads = _problem(torch.float64, steps=20)
    expected = _torch_two_groups(params, grads, foreach=False)
    got, _ = _run(_two_adamw_groups(), params, grads, path)
    for k, ref in expected.items():
        err = ((got[k] - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-10, f"{k}: relative error {err:.2e}"
    ungrouped, _ = _run(optim.adamw(3e-2, b2=0.95, weight_decay=0.1), params, grads, path)
    assert not torch.allclose(ungrouped["h.0.fc.bias"], got["h.0.fc.bias"])  # the groups matter


def test_partition_in_place_is_torch_fused_adamw_groups_bit_for_bit() -> None:
    params, grads = _problem(torch.float32, steps=20)
    expected = _torch_two_groups(params, grads, fused=True)
    got, _ = _run(_two_adamw_groups(), params, grads, "in_place")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("path", ["pure", "in_place", "skippable"])
def test_partition_is_each_groups_optimizer_on_its_own_parameters(path: str) -> None:
    params, grads = _problem(torch.bfloat16, steps=4)
    lr = optim.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    groups = {
        "matrix": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.lion(lr)),
        "vector": lambda: optim.sgd(lambda c: 10 * lr(c), 0.9),  # a per-group lr scale
    }
    got, state = _run(optim.partition({k: f() for k, f in groups.items()}, by_rank),
                      params, grads, path)  # fmt: skip
    for label, keys in (("matrix", MATRICES), ("vector", VECTORS)):
        alone, alone_state = _run(
            groups[label](), _subset(params, keys), [_subset(g, keys) for g in grads], path
        )
        _assert_equal((_subset(got, keys), state.inner_states[label]), (alone, alone_state))


def test_partition_in_place_matches_pure_float64() -> None:
    params, grads = _problem(torch.float64, steps=10)
    opt = optim.partition(
        {"matrix": optim.lamb(1e-2, weight_decay=0.1), "vector": optim.adagrad(0.1),
         "frozen": optim.set_to_zero()},
        lambda name, shape: "frozen" if name == "logit_scale" else by_rank(name, shape),
    )  # fmt: skip
    pure = _run(opt, params, grads, "pure")
    for path in ("in_place", "skippable"):
        got = _run(opt, params, grads, path)
        for x, y in zip(optree.tree_leaves(got), optree.tree_leaves(pure)):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert torch.equal(pure[0]["logit_scale"], params["logit_scale"])  # frozen


def test_partition_learning_rate_reads_the_first_group_that_has_one() -> None:
    opt = optim.partition(
        {"frozen": optim.set_to_zero(), "matrix": optim.sgd(0.5), "vector": optim.sgd(0.1)},
        by_rank,
    )
    params, _ = _problem(torch.float32, steps=0)
    assert opt.learning_rate(opt.init(params)).item() == 0.5


def test_partition_chained_after_clipping_keeps_the_fused_path_and_the_chain_rate() -> None:
    opt = optim.chain(optim.clip_by_global_norm(1.0), _two_adamw_groups())
    assert optim.in_place_unsupported_reason(opt) is None
    assert opt.learning_rate(opt.init(_problem(torch.float32, 0)[0])).item() == pytest.approx(3e-2)


def test_a_group_without_parameters_is_an_empty_state() -> None:
    params = {"w": torch.ones(2, 2)}
    opt = optim.partition({"matrix": optim.adamw(0.1), "vector": optim.adamw(0.1)}, by_rank)
    state = opt.update_({"w": torch.ones(2, 2)}, opt.init(params), params)
    assert state.inner_states["vector"][0].mu == {}


def test_set_to_zero_freezes_on_every_path() -> None:
    params, grads = _problem(torch.float32, steps=2)
    tx = optim.set_to_zero()
    for path in ("pure", "in_place", "skippable"):
        assert torch.equal(_run(tx, params, grads, path)[0]["wte.weight"], params["wte.weight"])
    g = _clone(grads[0])
    tx.transform_(g, tx.init(params), params)
    assert all(bool((v == 0).all()) for v in g.values())


# --------------------------------------------------------------------------- masked


@pytest.mark.parametrize("path", ["pure", "in_place", "skippable"])
def test_masked_weight_decay_in_a_chain_is_adamw_with_a_decay_mask(path: str) -> None:
    params, grads = _problem(torch.float64, steps=10)
    opt = optim.chain(
        optim.masked(optim.add_decayed_weights(0.1), optim.no_decay_for_norms_and_biases),
        optim.adam(1e-2),
    )
    expected, _ = _run(
        optim.adam(1e-2, weight_decay=0.1, mask=optim.no_decay_for_norms_and_biases),
        params, grads, path,
    )  # fmt: skip
    got, _ = _run(opt, params, grads, path)
    for k in params:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-12)


def test_masked_passes_the_other_updates_through() -> None:
    params, grads = _problem(torch.float32, steps=1)
    tx = optim.masked(optim.scale(-3.0), set(VECTORS))
    out, state = tx.update(grads[0], tx.init(params), params)
    for k in MATRICES:
        assert out[k] is grads[0][k]
    for k in VECTORS:
        assert torch.equal(out[k], -3.0 * grads[0][k])
    assert state == optim.MaskedState(optim.EmptyState())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_in_place_is_bit_for_bit_the_pure_update(dtype) -> None:
    params, grads = _problem(dtype, steps=3)
    tx = optim.masked(optim.chain(optim.clip_by_global_norm(0.5), optim.scale(-0.1)), by_rank_mask)
    pure = _run(tx, params, grads, "pure")
    for path in ("in_place", "skippable"):
        _assert_equal(_run(tx, params, grads, path), pure)


@pytest.mark.parametrize("path", ["in_place", "skippable"])
def test_masked_optimizer_steps_its_parameters_with_its_kernel_and_adds_the_rest(path) -> None:
    params, grads = _problem(torch.float32, steps=3)
    got, state = _run(optim.masked(optim.sgd(0.1, 0.9), by_rank_mask), params, grads, path)
    alone, alone_state = _run(
        optim.sgd(0.1, 0.9), _subset(params, MATRICES), [_subset(g, MATRICES) for g in grads], path
    )
    _assert_equal((_subset(got, MATRICES), state.inner_state), (alone, alone_state))
    for k in VECTORS:  # optax semantics: the unselected updates (the gradients) pass through
        expected = params[k].clone()
        for g in grads:
            expected = expected + g[k]
        assert torch.equal(got[k], expected), k
    pure, _ = _run(optim.masked(optim.sgd(0.1, 0.9), by_rank_mask), params, grads, "pure")
    for k in params:
        torch.testing.assert_close(got[k], pure[k], rtol=1e-6, atol=1e-6)


def by_rank_mask(name: str, shape: torch.Size) -> bool:
    return len(shape) >= 2


def test_masked_learning_rate_and_unsupported_reason() -> None:
    params, _ = _problem(torch.float32, steps=0)
    tx = optim.masked(optim.adamw(0.25), {"wte.weight"})
    assert tx.learning_rate(tx.init(params)).item() == 0.25
    assert optim.in_place_unsupported_reason(optim.masked(optim.scale_by_adam(), {"w"})) == (
        "masked, member 0 (scale_by_adam) has neither update_ nor transform_ (it only has the "
        "pure update)"
    )
    chained = optim.chain(optim.partition({"a": optim.trace(0.9)}, {"w": "a"}), optim.sgd(0.1))
    assert optim.in_place_unsupported_reason(chained) == (
        "chain member 0 (partition), member 0 (trace) has no in-place transform_ (it only has the "
        "pure update)"
    )


# --------------------------------------------------------------------------- rules


def _shard(tree: dict, rank: int, world: int = 2) -> dict:
    out = {}
    for k, v in tree.items():
        flat = v.reshape(-1)
        padded = -(-flat.numel() // world) * world
        flat = torch.cat([flat, flat.new_zeros(padded - flat.numel())])
        out[k] = flat.chunk(world)[rank].clone()
    return out


def test_every_rule_form_forms_the_same_groups_on_shards_given_global_shapes() -> None:
    params, _ = _problem(torch.float32, steps=0)
    shards = _shard(params, 1)
    shapes = {k: v.shape for k, v in params.items()}
    expected = {k: by_rank(k, torch.Size(s)) for k, s in SHAPES.items()}
    tree_fn = lambda tree: {n: "matrix" if p.ndim >= 2 else "vector" for n, p in tree.items()}
    for labels, given in ((by_rank, shapes), (tree_fn, shapes), (expected, None)):
        rule = optim.masks.ParamRule("partition", labels, given, arg="labels", labels=True)
        assert rule.check(shards) == expected
    # optax's form sees meta tensors of the global shape and the tensor's dtype: no memory
    seen = {}
    optim.masks.ParamRule("masked", lambda tree: seen.update(tree) or dict.fromkeys(tree, True),
                          shapes).check(shards)  # fmt: skip
    assert {k: (v.shape, v.device.type, v.dtype) for k, v in seen.items()} == {
        k: (torch.Size(s), "meta", torch.float32) for k, s in SHAPES.items()
    }
    without = optim.masks.ParamRule("partition", by_rank, None, arg="labels", labels=True)
    assert set(without.check(shards).values()) == {"vector"}  # shards are 1-D: why shapes matter


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: optim.partition({}, by_rank), TypeError, r"must be a non-empty dict"),
        (lambda: optim.partition({"a/b": optim.sgd(0.1)}, by_rank), TypeError,
         r"label 'a/b' must be a non-empty string without '/'"),
        (lambda: optim.partition({"a": optim.scale_by_adam}, by_rank), TypeError,
         r"transforms\['a'\] is function, not a GradientTransformation"),
        (lambda: optim.partition({"a": optim.sgd(0.1)}, "a"), TypeError,
         r"labels='a' is a string"),
        (lambda: optim.partition({"a": optim.sgd(0.1)}, {"w": 1}), TypeError,
         r"labels values must be non-empty strings"),
        (lambda: optim.masked(optim.sgd(0.1), {"w"}, shapes={"w": (2,)}), ValueError,
         r"shapes are only read by a predicate mask"),
        (lambda: optim.masked(optim.sgd, {"w"}), TypeError, r"masked: inner is function"),
    ],
)  # fmt: skip
def test_bad_groups_are_rejected_when_built(build, error, message: str) -> None:
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: optim.partition({"matrix": optim.sgd(0.1)}, by_rank), KeyError,
         r"parameter 'h.0.fc.bias' has label 'vector', which has no transform"),
        (lambda: optim.partition({"a": optim.sgd(0.1)}, {"wte.weight": "a"}), KeyError,
         r"labels has no entry for parameter 'h.0.fc.weight'"),
        (lambda: optim.partition({"a": optim.sgd(0.1)}, lambda tree: {"wte.weight": "a"}),
         KeyError, r"labels function must return an entry for exactly the parameters"),
        (lambda: optim.partition({"a": optim.sgd(0.1)}, lambda name, shape: 3), TypeError,
         r"labels predicate returned 3 for 'wte.weight'"),
        (lambda: optim.masked(optim.sgd(0.1), {"wte.weigth"}), KeyError,
         r"the mask names \['wte.weigth'\], which are not"),
        (lambda: optim.masked(optim.sgd(0.1), by_rank_mask, shapes={"wte.weight": (11, 4)}),
         KeyError, r"shapes has no entry for parameter 'h.0.fc.weight'"),
    ],
)  # fmt: skip
def test_groups_that_do_not_fit_the_parameters_fail_at_init(build, error, message: str) -> None:
    params, _ = _problem(torch.float32, steps=0)
    with pytest.raises(error, match=message):
        build().init(params)


# --------------------------------------------------------------------------- ZeRO stage 3


def _composite_optimizer(shapes: dict | None) -> optim.GradientTransformation:
    """Clipping, a mask and two groups, accumulated over 2 updates and guarded against inf."""

    def labels(tree: dict) -> dict:  # optax's form: meta tensors of the global shapes
        return {n: "decay" if p.ndim >= 2 else "no_decay" for n, p in tree.items()}

    inner = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.masked(optim.scale(0.5), optim.no_decay_for_norms_and_biases, shapes=shapes),
        optim.partition(
            {"decay": optim.adamw(1e-2, weight_decay=0.5), "no_decay": optim.sgd(0.3, 0.9)},
            labels, shapes=shapes,
        ),
    )  # fmt: skip
    return optim.apply_if_finite(optim.MultiSteps(inner, 2), 3)


def _train(stage: int, world: int, rank: int, global_shapes: bool) -> dict[str, torch.Tensor]:
    import funczero
    from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
    from funczero.train.evaluation import full_state_dict

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, seq_len=8, d_model=16, n_layers=1, n_heads=2))
    shapes = {n: p.shape for n, p in model.named_parameters()} if global_shapes else None
    opt = _composite_optimizer(shapes)
    assert optim.in_place_unsupported_reason(opt) is None
    micro = 4 // world
    config = {"train_micro_batch_size_per_gpu": micro,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}  # fmt: skip
    run = funczero.initialize(model, config, cross_entropy_loss, optimizer=opt, device="cpu")
    state = run.state
    for step in range(4):
        ids = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(step))
        mine = ids[rank * micro : (rank + 1) * micro]
        state, _ = run.train_step(state, (mine[:, :-1], mine[:, 1:]))
    return {k: v.clone() for k, v in full_state_dict(run.plan, state).items()}  # ties: copies


def _stage3_worker(rank: int, world: int, out: str) -> None:
    with_shapes = _train(3, world, rank, global_shapes=True)
    without = _train(3, world, rank, global_shapes=False)
    if rank == 0:
        save_file({**{f"with/{k}": v for k, v in with_shapes.items()},
                   **{f"without/{k}": v for k, v in without.items()}}, out)  # fmt: skip


def test_stage3_groups_from_global_shapes_follow_the_stage0_trajectory() -> None:
    from funczero.testing.distributed import run_distributed

    expected = _train(0, 1, 0, global_shapes=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "stage3.safetensors")
        run_distributed(_stage3_worker, 2, out, timeout=300)
        got = load_file(out)
    moved = 0
    for k, ref in expected.items():
        torch.testing.assert_close(got[f"with/{k}"], ref, rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.allclose(got[f"without/{k}"], ref, rtol=1e-3, atol=1e-4))
    assert moved >= 2  # on 1-D shards, a rule without the global shapes forms other groups


def test_group_states_are_laid_out_per_parameter_like_the_moments_at_stage3() -> None:
    import funczero
    from funczero.parallel.plan import build_plan

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    plan = build_plan(model, stage=3)
    opt = optim.MultiSteps(
        optim.partition({"matrix": optim.adamw(1e-3), "vector": optim.sgd(0.1, 0.9)}, by_rank,
                        shapes=dict(plan.spec.shapes)),
        2,
    )  # fmt: skip
    params, buffers = funczero.module.extract_tensors(model, plan.spec)
    state = funczero.init_state(plan, opt, params, buffers)
    layouts = {p: lay for p, lay in state.layout.leaves if p.startswith("opt_state/")}
    per_param = {p: lay for p, lay in layouts.items() if p.rsplit("/", 1)[-1] in plan.spec.params}
    assert {p for p in per_param if "/inner_states/matrix/" in p} == {
        "opt_state/inner_opt_state/inner_states/matrix/0/mu/0.weight",
        "opt_state/inner_opt_state/inner_states/matrix/0/nu/0.weight",
    }
    assert len(per_param) == 2 + 3 + 4  # adamw's mu, nu; sgd's 3 traces; 4 accumulators
    assert all(lay.kind == "moment" and lay.placement == "shard" for lay in per_param.values())
    assert all(lay.placement == "replicated" for p, lay in layouts.items() if p not in per_param)
