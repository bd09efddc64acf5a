"""Weight-decay masks: torch.optim parameter groups (decay / no decay) on every path and on shards."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import optree
import pytest
import torch
from conftest import shard_tree, thread_all_reduce

from funczero import optim

SHAPES = {"wte.weight": (11, 4), "h.0.fc.weight": (6, 4), "h.0.fc.bias": (6,),
          "h.0.ln.weight": (4,), "logit_scale": ()}  # fmt: skip
DECAYED = ["h.0.fc.weight", "wte.weight"]  # what no_decay_for_norms_and_biases keeps
STEPS = 20


def _problem(dtype: torch.dtype, steps: int = STEPS, seed: int = 0) -> tuple[dict, list[dict]]:
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


def _run(opt: optim.GradientTransformation, params: dict, grads: list[dict], path: str) -> dict:
    params = _clone(params)
    state = opt.init(params)
    for g in grads:
        if path == "pure":
            updates, state = opt.update(g, state, params)
            params = optim.apply_updates(params, updates)
        elif path == "in_place":
            state = opt.update_(g, state, params)
        else:  # a step that may be skipped: the generic path where no kernel takes found_inf
            state = opt.update_(g, state, params, found_inf=torch.tensor(0.0))
    return params


def _torch_two_groups(params: dict, grads: list[dict], **kwargs) -> dict:
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    groups = [
        {"params": [leaves[k] for k in DECAYED], "weight_decay": 0.1},
        {"params": [p for k, p in leaves.items() if k not in DECAYED], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), **kwargs)
    for g in grads:
        for k, p in leaves.items():
            p.grad = g[k].clone()
        opt.step()
    return {k: v.detach() for k, v in leaves.items()}


def _masked_adamw() -> optim.GradientTransformation:
    return optim.adamw(1e-2, b2=0.95, weight_decay=0.1, mask=optim.no_decay_for_norms_and_biases)


@pytest.mark.parametrize("path", ["pure", "in_place", "skippable"])
def test_masked_adamw_matches_torch_adamw_with_decay_and_no_decay_groups_float64(path) -> None:
    params, grads = _problem(torch.float64)
    expected = _torch_two_groups(params, grads, foreach=False)
    got = _run(_masked_adamw(), params, grads, path)
    for k, ref in expected.items():
        err = ((got[k] - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-10, f"{k}: relative error {err:.2e}"
    unmasked = _run(optim.adamw(1e-2, b2=0.95, weight_decay=0.1), params, grads, path)
    assert not torch.allclose(unmasked["h.0.fc.bias"], got["h.0.fc.bias"])  # the mask matters


def test_masked_adamw_in_place_equals_torch_fused_adamw_groups_bit_for_bit() -> None:
    params, grads = _problem(torch.float32)
    expected = _torch_two_groups(params, grads, fused=True)
    got = _run(_masked_adamw(), params, grads, "in_place")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


ALIASES: dict[str, Callable[..., optim.GradientTransformation]] = {
    "adamw": lambda **kw: optim.adamw(1e-2, **kw),
    "adamw_sched_b1": lambda **kw: optim.adamw(1e-2, optim.linear_schedule(0.8, 0.9, 10), **kw),
    "adam": lambda **kw: optim.adam(1e-2, **kw),
    "sgd": lambda **kw: optim.sgd(0.1, 0.9, nesterov=True, **kw),
    "adagrad": lambda **kw: optim.adagrad(0.1, lr_decay=0.01, **kw),
    "lion": lambda **kw: optim.lion(1e-3, **kw),
    "lamb": lambda **kw: optim.lamb(1e-2, **kw),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["pure", "in_place", "skippable"])
@pytest.mark.parametrize("name", list(ALIASES))
def test_a_mask_is_two_optimizers_one_with_and_one_without_decay(name, path, dtype) -> None:
    """Every update is per parameter, so masked == decayed subset + undecayed subset, exactly."""
    params, grads = _problem(dtype, steps=4)
    make = ALIASES[name]
    got = _run(make(weight_decay=0.3, mask=set(DECAYED)), params, grads, path)

    def subset(tree: dict, keys: list[str]) -> dict:
        return {k: tree[k] for k in keys}

    rest = [k for k in SHAPES if k not in DECAYED]
    on = _run(
        make(weight_decay=0.3), subset(params, DECAYED), [subset(g, DECAYED) for g in grads], path
    )
    off = _run(make(weight_decay=0.0), subset(params, rest), [subset(g, rest) for g in grads], path)
    for k, v in {**on, **off}.items():
        assert torch.equal(got[k], v), k


def test_mask_forms_agree() -> None:
    params, grads = _problem(torch.float32, steps=3)
    table = {k: k in DECAYED for k in SHAPES}
    results = [
        _run(optim.adamw(1e-2, weight_decay=0.2, mask=mask), params, grads, "in_place")
        for mask in (optim.no_decay_for_norms_and_biases, set(DECAYED), tuple(DECAYED), table,
                     lambda name, shape: name in DECAYED,
                     lambda tree: {n: p.ndim >= 2 for n, p in tree.items()})  # optax's form
    ]  # fmt: skip
    for other in results[1:]:
        for k in params:
            assert torch.equal(results[0][k], other[k]), k


def test_add_decayed_weights_mask_pure_and_in_place() -> None:
    params = {"w": torch.full((2, 2), 2.0), "b": torch.full((2,), 2.0)}
    tx = optim.add_decayed_weights(0.5, mask=optim.no_decay_for_norms_and_biases)
    out, _ = tx.update({k: torch.ones_like(v) for k, v in params.items()}, tx.init(params), params)
    assert torch.equal(out["w"], torch.full((2, 2), 2.0)) and torch.equal(out["b"], torch.ones(2))
    updates = {k: torch.ones_like(v) for k, v in params.items()}
    tx.transform_(updates, tx.init(params), params)
    assert torch.equal(updates["w"], out["w"]) and torch.equal(updates["b"], out["b"])


def test_no_decay_for_norms_and_biases_on_a_module() -> None:
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
        torch.nn.RMSNorm(4),
    )  # fmt: skip
    decayed = {
        n for n, p in model.named_parameters() if optim.no_decay_for_norms_and_biases(n, p.shape)
    }
    assert decayed == {"0.weight", "1.weight"}


# --------------------------------------------------------------------------- ZeRO shards

WORLD = 2


def _shard(tree: dict, rank: int) -> dict:
    return shard_tree(tree, rank, WORLD)


def _barrier_all_reduce() -> Callable[[int], Callable[[torch.Tensor], torch.Tensor]]:
    return thread_all_reduce(WORLD)


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "in_place"])
@pytest.mark.parametrize("name", ["adamw", "lamb", "lion"])
def test_a_shape_predicate_with_global_shapes_is_right_on_zero_shards(name, inplace) -> None:
    params, grads = _problem(torch.float64, steps=4)
    global_shapes = {k: v.shape for k, v in params.items()}
    make = ALIASES[name]
    kwargs = {"weight_decay": 0.3, "mask": optim.no_decay_for_norms_and_biases}
    expected = _run(make(**kwargs), params, grads, "pure")
    reducers = _barrier_all_reduce()

    def rank_main(rank: int) -> dict:
        opt = make(**kwargs, shapes=global_shapes)
        p = _shard(params, rank)
        state = opt.init(p)  # every shard is 1-D: only the global shapes tell a bias from a matrix
        for g in grads:
            g = _shard(g, rank)
            if inplace:
                state = opt.update_(g, state, p, reduce_fn=reducers(rank))
            else:
                updates, state = opt.update(g, state, p, reduce_fn=reducers(rank))
                p = optim.apply_updates(p, updates)
        return p

    with ThreadPoolExecutor(WORLD) as pool:
        shards = list(pool.map(rank_main, range(WORLD)))
    for k, v in expected.items():
        flat = torch.cat([s[k] for s in shards])[: v.numel()].reshape(v.shape)
        torch.testing.assert_close(flat, v, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: optim.adamw(1e-3, mask="bias"), TypeError, r"adamw: mask='bias' is a string"),
        (lambda: optim.adamw(1e-3, mask={"w": 1}), TypeError, r"mask values must be True/False"),
        (lambda: optim.adamw(1e-3, mask=3), TypeError, r"mask=3 must be a predicate"),
        (lambda: optim.adamw(1e-3, shapes={"w": (2,)}), ValueError, r"only read by a predicate"),
        (lambda: optim.lion(1e-3, mask={"w"}, shapes={"w": (2,)}), ValueError,
         r"lion: shapes are only read by a predicate mask"),
    ],
)  # fmt: skip
def test_bad_masks_are_rejected_when_built(build, error, message: str) -> None:
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mask": {"wte.weigth"}}, KeyError, r"mask names \['wte.weigth'\], which are not"),
        ({"mask": {"wte.weight": True}}, KeyError, r"no entry for parameter 'h.0.fc.weight'"),
        ({"mask": optim.no_decay_for_norms_and_biases, "shapes": {"wte.weight": (11, 4)}},
         KeyError, r"shapes has no entry for parameter 'h.0.fc.weight'"),
        ({"mask": optim.no_decay_for_norms_and_biases,
          "shapes": {**{k: s for k, s in SHAPES.items()}, "h.0.fc.bias": (2,)}},
         ValueError, r"shapes\['h.0.fc.bias'\]=\(2,\) cannot be the global shape"),
        ({"mask": lambda name, shape: 1}, TypeError, r"predicate returned 1 for"),
    ],
)  # fmt: skip
def test_masks_that_do_not_fit_the_parameters_fail_at_init(kwargs, error, message: str) -> None:
    params, _ = _problem(torch.float32, steps=0)
    opt = optim.adamw(1e-3, **kwargs)
    with pytest.raises(error, match=message):
        opt.init(params)


def test_state_layout_does_not_depend_on_the_mask() -> None:
    params, _ = _problem(torch.float32, steps=0)
    masked = optree.tree_structure(_masked_adamw().init(params))
    assert masked == optree.tree_structure(optim.adamw(1e-2).init(params))
