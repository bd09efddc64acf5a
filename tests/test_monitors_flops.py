"""FLOPs per token (formula and counter), peak FLOPS and MFU."""

from __future__ import annotations

import pytest
import torch

from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.monitors.flops import (
    count_flops_per_token,
    mfu,
    peak_flops,
    transformer_flops_per_token,
)


def test_counted_flops_of_a_gpt_match_the_transformer_formula() -> None:
    cfg = GPTConfig(vocab_size=64, seq_len=32, d_model=64, n_layers=2, n_heads=2)
    model = GPT(cfg, device="meta")
    ids = torch.empty(2, cfg.seq_len, dtype=torch.long, device="meta")
    counted = count_flops_per_token(model, (ids, ids), cross_entropy_loss, tokens=ids.numel())
    n = sum(p.numel() for p in model.parameters())
    embeddings = cfg.seq_len * cfg.d_model  # position table; the tied token table is the head
    formula = transformer_flops_per_token(n_params=n, n_layers=2, d_model=64, seq_len=32,
                                          n_embedding_params=embeddings)
    # The formula ignores biases, norms and the softmax; matmuls dominate.
    assert counted.per_token == pytest.approx(formula, rel=0.1)
    assert counted.backward == pytest.approx(2 * counted.forward, rel=0.05)
    top = counted.table(depth=1, top=1)
    assert top[0][0] == "GPT" and top[1][0].startswith("GPT.")


def test_recompute_factor_adds_that_share_of_the_forward() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(16, 16)
    x = torch.empty(8, 16, device="meta", requires_grad=True)
    plain = count_flops_per_token(model, x, lambda m, b: m(b).sum(), tokens=8)
    remat = count_flops_per_token(model, x, lambda m, b: m(b).sum(), tokens=8,
                                  recompute_fwd_factor=1.0)
    assert remat.per_token - plain.per_token == pytest.approx(plain.forward / 8)
    assert plain.backward == 2 * plain.forward  # gradients of input and weight


def test_mfu_and_bad_values() -> None:
    assert mfu(flops_per_token=1e9, tokens_per_second=1e3, peak_flops=1e13, devices=2) == 0.05
    with pytest.raises(ValueError, match="peak_flops=0"):
        mfu(flops_per_token=1.0, tokens_per_second=1.0, peak_flops=0)
    with pytest.raises(ValueError, match="n_layers=-1"):
        transformer_flops_per_token(n_params=1, n_layers=-1, d_model=1, seq_len=1)
    assert peak_flops("cpu") is None
