"""Parity of the aliases with torch.optim in float64: 50 steps of random gradients.

Both the pure path (``update`` + ``apply_updates``) and the in-place path (``update_``, which takes
the fused kernels for these optimizers) must match ``torch.optim`` (single-tensor implementation)
to a relative error of 1e-10.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from funczero import optim

SHAPES = {"embed.weight": (11, 4), "block.0.fc.weight": (6, 4), "block.0.fc.bias": (6,),
          "head.scale": ()}  # fmt: skip
STEPS = 50
REL_TOL = 1e-10


def _problem(dtype: torch.dtype, seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
    grads = [
        {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
        for _ in range(STEPS)
    ]
    return params, grads


def _run_torch(cls: type, kwargs: dict[str, Any], params: dict, grads: list[dict]) -> dict:
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = cls(list(leaves.values()), foreach=False, **kwargs)
    for g in grads:
        for k, p in leaves.items():
            p.grad = g[k].clone()
        opt.step()
    return {k: v.detach() for k, v in leaves.items()}


def _run_pure(opt: optim.Optimizer, params: dict, grads: list[dict]) -> dict:
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params


def _run_inplace(opt: optim.Optimizer, params: dict, grads: list[dict]) -> dict:
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    for g in grads:
        state = opt.update_(g, state, params)
    return params


def _assert_rel(actual: dict, expected: dict, tol: float) -> None:
    for k, ref in expected.items():
        scale = ref.abs().max().clamp(min=1e-300)
        err = ((actual[k] - ref).abs().max() / scale).item()
        assert err <= tol, f"{k}: relative error {err:.3e} > {tol:.0e}"


CASES: list[tuple[str, type, dict[str, Any], Callable[[], optim.Optimizer]]] = [
    ("adam", torch.optim.Adam, {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8},
     lambda: optim.adam(1e-2, 0.9, 0.99, 1e-8)),
    ("adam_l2", torch.optim.Adam, {"lr": 3e-2, "betas": (0.8, 0.999), "weight_decay": 0.1},
     lambda: optim.adam(3e-2, 0.8, 0.999, weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-6,
                                  "weight_decay": 0.1},
     lambda: optim.adamw(1e-2, 0.9, 0.95, 1e-6, weight_decay=0.1)),
    ("adamw_default_decay", torch.optim.AdamW, {"lr": 1e-3},
     lambda: optim.adamw(1e-3)),
    ("sgd_plain", torch.optim.SGD, {"lr": 0.1}, lambda: optim.sgd(0.1)),
    ("sgd_momentum", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9},
     lambda: optim.sgd(0.05, 0.9)),
    ("sgd_nesterov_decay", torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True,
                                             "weight_decay": 0.01},
     lambda: optim.sgd(0.05, 0.8, nesterov=True, weight_decay=0.01)),
    ("sgd_dampening_decay", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3,
                                              "weight_decay": 0.05},
     lambda: optim.sgd(0.05, 0.9, dampening=0.3, weight_decay=0.05)),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.1}, lambda: optim.adagrad(0.1)),
    ("adagrad_decay_l2", torch.optim.Adagrad, {"lr": 0.2, "lr_decay": 0.05, "weight_decay": 0.1,
                                               "initial_accumulator_value": 0.3, "eps": 1e-8},
     lambda: optim.adagrad(0.2, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.3,
                           eps=1e-8)),
]  # fmt: skip


@pytest.fixture(scope="module")
def problem() -> tuple[dict, list[dict]]:
    return _problem(torch.float64)


@pytest.mark.parametrize(("name", "cls", "kwargs", "make"), CASES, ids=[c[0] for c in CASES])
def test_pure_update_matches_torch_optim_float64(problem, name, cls, kwargs, make) -> None:
    params, grads = problem
    expected = _run_torch(cls, kwargs, params, grads)
    _assert_rel(_run_pure(make(), params, grads), expected, REL_TOL)


@pytest.mark.parametrize(("name", "cls", "kwargs", "make"), CASES, ids=[c[0] for c in CASES])
def test_inplace_update_matches_torch_optim_float64(problem, name, cls, kwargs, make) -> None:
    params, grads = problem
    expected = _run_torch(cls, kwargs, params, grads)
    _assert_rel(_run_inplace(make(), params, grads), expected, REL_TOL)


def test_adam_with_changing_betas_matches_torch_optim() -> None:
    """A scheduled b1 behaves like torch with ``param_groups[0]['betas']`` edited every step."""
    params, grads = _problem(torch.float64, seed=3)
    b1_of = [0.8 + 0.1 * (i % 5) / 4 for i in range(STEPS)]
    table = torch.tensor(b1_of, dtype=torch.float64)

    def b1(count: torch.Tensor) -> torch.Tensor:
        return table[count].to(torch.float32)

    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    ref = torch.optim.Adam(list(leaves.values()), lr=1e-2, foreach=False)
    for i, g in enumerate(grads):
        ref.param_groups[0]["betas"] = (float(torch.tensor(b1_of[i], dtype=torch.float32)), 0.999)
        for k, p in leaves.items():
            p.grad = g[k].clone()
        ref.step()
    expected = {k: v.detach() for k, v in leaves.items()}
    _assert_rel(_run_pure(optim.adam(1e-2, b1), params, grads), expected, REL_TOL)
    _assert_rel(_run_inplace(optim.adam(1e-2, b1), params, grads), expected, REL_TOL)


def test_clip_by_global_norm_matches_clip_grad_norm() -> None:
    params, grads = _problem(torch.float64, seed=5)
    tx = optim.clip_by_global_norm(1.5)
    for g in grads[:5]:
        ref = {k: v.clone().requires_grad_() for k, v in params.items()}
        for k, p in ref.items():
            p.grad = g[k].clone()
        norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), 1.5)
        assert torch.allclose(optim.global_norm(g), norm, rtol=1e-12, atol=0)
        clipped, _ = tx.update(g, tx.init(params))
        _assert_rel(clipped, {k: p.grad for k, p in ref.items()}, 1e-14)
