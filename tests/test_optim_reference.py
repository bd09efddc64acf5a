"""Lion and LAMB against straightforward re-implementations of their published update rules."""

from __future__ import annotations

import math

import pytest
import torch

from funczero import optim

SHAPES = {"w": (8, 3), "b": (3,), "v": (2, 2, 2)}
STEPS = 50


def _problem(seed: int = 0, zero_bias: bool = False) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    if zero_bias:
        params["b"].zero_()
    grads = [
        {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
        for _ in range(STEPS)
    ]
    return params, grads


def _lion_reference(params, grads, *, lr, b1, b2, wd):
    """Chen et al. 2023, Algorithm 2 (decoupled weight decay scaled by the learning rate)."""
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    for g in grads:
        for k, gk in g.items():
            c = b1 * m[k] + (1 - b1) * gk
            p[k] = p[k] - lr * (torch.sign(c) + wd * p[k])
            m[k] = b2 * m[k] + (1 - b2) * gk
    return p


def _lamb_reference(params, grads, *, lr, b1, b2, eps, wd, bias_correction, lo, hi):
    """You et al. 2019, Algorithm 2, with DeepSpeed FusedLamb's clamp of the trust ratio."""
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(x) for k, x in params.items()}
    for t, g in enumerate(grads, start=1):
        for k, gk in g.items():
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            bc1 = 1 - b1**t if bias_correction else 1.0
            bc2 = 1 - b2**t if bias_correction else 1.0
            r = (m[k] / bc1) / ((v[k] / bc2).sqrt() + eps)
            u = r + wd * p[k]
            w_norm = math.sqrt(float((p[k] * p[k]).sum()))
            u_norm = math.sqrt(float((u * u).sum()))
            ratio = min(max(w_norm / u_norm, lo), hi) if w_norm > 0 and u_norm > 0 else 1.0
            p[k] = p[k] - lr * ratio * u
    return p


def _run(opt, params, grads, inplace):
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    for g in grads:
        if inplace:
            state = opt.update_(g, state, params)
        else:
            updates, state = opt.update(g, state, params)
            params = optim.apply_updates(params, updates)
    return params


def _assert_close(actual, expected, tol=1e-10):
    for k in expected:
        err = (actual[k] - expected[k]).abs().max() / expected[k].abs().max().clamp(min=1e-300)
        assert err.item() <= tol, f"{k}: relative error {err.item():.3e}"


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_lion_matches_published_update(inplace: bool, wd: float) -> None:
    params, grads = _problem(seed=1)
    expected = _lion_reference(params, grads, lr=1e-3, b1=0.9, b2=0.99, wd=wd)
    _assert_close(_run(optim.lion(1e-3, weight_decay=wd), params, grads, inplace), expected)


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weight_decay": 0.01},
        {"bias_correction": False, "weight_decay": 0.1},
        {"b1": 0.8, "b2": 0.99, "eps": 1e-8, "max_coeff": 1.5, "min_coeff": 0.9},
    ],
    ids=["default", "decay", "no_bias_correction", "tight_clamp"],
)
def test_lamb_matches_published_update_with_deepspeed_clamp(inplace: bool, kwargs: dict) -> None:
    params, grads = _problem(seed=2, zero_bias=True)  # a zero bias exercises ratio = 1
    full = {"b1": 0.9, "b2": 0.999, "eps": 1e-6, "weight_decay": 0.0, "bias_correction": True,
            "max_coeff": 10.0, "min_coeff": 0.01, **kwargs}  # fmt: skip
    expected = _lamb_reference(
        params, grads, lr=1e-2, b1=full["b1"], b2=full["b2"], eps=full["eps"],
        wd=full["weight_decay"], bias_correction=full["bias_correction"],
        lo=full["min_coeff"], hi=full["max_coeff"],
    )  # fmt: skip
    _assert_close(_run(optim.lamb(1e-2, **kwargs), params, grads, inplace), expected)


def test_lamb_trust_ratio_is_clamped_and_one_for_zero_norms() -> None:
    tx = optim.scale_by_trust_ratio(min_coeff=0.5, max_coeff=2.0)
    params = {"big": torch.full((4,), 100.0), "small": torch.full((4,), 1e-3),
              "zero": torch.zeros(4), "mid": torch.full((4,), 1.5)}  # fmt: skip
    updates = {"big": torch.ones(4), "small": torch.ones(4), "zero": torch.ones(4),
               "mid": torch.ones(4)}  # fmt: skip
    out, _ = tx.update(updates, tx.init(params), params)
    assert torch.equal(out["big"], torch.full((4,), 2.0))  # 100 clamped to max
    assert torch.equal(out["small"], torch.full((4,), 0.5))  # 1e-3 clamped to min
    assert torch.equal(out["zero"], torch.ones(4))  # zero parameter norm -> ratio 1
    torch.testing.assert_close(out["mid"], torch.full((4,), 1.5))
    zero_update, _ = tx.update({"mid": torch.zeros(4)}, tx.init(params), params)
    assert torch.equal(zero_update["mid"], torch.zeros(4))
