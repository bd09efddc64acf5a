"""clip_coefficient (the one global-norm clipping formula) and clip_by_global_norm's in-place form."""

from __future__ import annotations

import pytest
import torch

from funczero import optim


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_coefficient_is_deepspeeds_formula_bit_for_bit(dtype) -> None:
    norms = torch.tensor([0.0, 1e-7, 0.5, 1.0, 1.0 + 1e-6, 3.0, 1e30, float("inf")], dtype=dtype)
    for max_norm in (1.0, 0.25, 7.5):
        for norm in norms:
            # DeepSpeed's gradient_clipping, as the training step wrote it before this function.
            expected = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            got = optim.clip_coefficient(norm, max_norm)
            assert got.dtype == dtype and got.ndim == 0 and torch.equal(got, expected)
    assert torch.isnan(optim.clip_coefficient(torch.tensor(float("nan")), 1.0))


def test_the_epsilon_is_one_named_constant_used_by_the_transform() -> None:
    assert optim.CLIP_NORM_EPS == 1e-6
    g = {"w": torch.tensor([1.0], dtype=torch.float64)}  # norm exactly max_norm: still scaled
    tx = optim.clip_by_global_norm(1.0)
    out, _ = tx.update(g, tx.init(g))
    assert out["w"].item() == 1.0 / (1.0 + optim.CLIP_NORM_EPS)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan")])
def test_clip_coefficient_rejects_a_non_positive_max_norm(max_norm: float) -> None:
    with pytest.raises(ValueError, match=r"clip_coefficient: max_norm=.* must be > 0"):
        optim.clip_coefficient(torch.tensor(1.0), max_norm)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32,) * 3,
        (torch.bfloat16,) * 3,
        (torch.float64,) * 3,
        (torch.float32, torch.bfloat16, torch.float64),
        (torch.float16, torch.float32, torch.float32),
    ],
    ids=["fp32", "bf16", "fp64", "mixed", "fp16_fp32"],
)
def test_clip_in_place_equals_clip_pure_bit_for_bit(dtypes) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = {
        f"g{i}": (5 * torch.randn(shape, generator=gen)).to(dtype)
        for i, (shape, dtype) in enumerate(zip([(7, 3), (5,), ()], dtypes))
    }
    tx = optim.clip_by_global_norm(0.5)
    expected, _ = tx.update(grads, tx.init(grads))
    state = tx.transform_(grads, tx.init(grads))
    assert state == optim.EmptyState()
    for k, v in expected.items():
        assert grads[k].dtype == v.dtype and torch.equal(grads[k], v), k


def test_clip_in_place_reduces_once_and_handles_an_empty_tree() -> None:
    calls = []
    tx = optim.clip_by_global_norm(1.0)
    g = {"w": torch.full((4,), 2.0)}
    # reduce_fn doubles the sum of squares, as if a second rank held the same shard
    tx.transform_(g, tx.init(g), reduce_fn=lambda x: (calls.append(1), x * 2)[1])
    assert calls == [1]
    torch.testing.assert_close(g["w"], torch.full((4,), 2.0 / (32**0.5 + 1e-6)))
    assert tx.transform_({}, tx.init({})) == optim.EmptyState()
