"""Single-process behaviour of make_train_step: purity, donation, accumulation, skipping, RNG."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from funczero import DonatedStateError, optim, tree
from funczero.module import extract_tensors, release_module_tensors
from funczero.train.loss_scale import LossScaleConfig
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.parallel.plan import build_plan
from funczero.train.step import init_state, make_train_step

CFG = GPTConfig(vocab_size=37, seq_len=8, d_model=16, n_layers=2, n_heads=2)


def build(opt, *, cfg=CFG, precision="fp32", seed=0, **step_kw):
    torch.manual_seed(0)
    model = GPT(cfg)
    plan = build_plan(model, stage=0, precision=precision)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    state = init_state(plan, opt, params, buffers, seed=seed, loss_scale=step_kw.get("loss_scale"))
    return state, make_train_step(cross_entropy_loss, opt, plan, **step_kw)


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 37, (n, 8), generator=g), torch.randint(0, 37, (n, 8), generator=g))


def test_matches_eager_adamw_with_clipping() -> None:
    opt = optim.adamw(1e-2, weight_decay=0.1)
    state, step = build(opt, gradient_clipping=0.5)
    torch.manual_seed(0)
    model = GPT(CFG)
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for i in range(5):
        b = batch(seed=i)
        state, metrics = step(state, b)
        torch_opt.zero_grad()
        loss = cross_entropy_loss(model, b)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        torch_opt.step()
        assert abs(metrics["loss"].item() - loss.item()) < 1e-5
        assert abs(metrics["grad_norm"].item() - norm.item()) < 1e-5 * max(1.0, norm.item())
    for n, p in model.named_parameters():
        if n in state.params:
            torch.testing.assert_close(state.params[n], p.detach(), atol=1e-5, rtol=0, msg=n)


def test_donated_state_raises_on_reuse() -> None:
    state, step = build(optim.sgd(0.1))
    new_state, _ = step(state, batch())
    with pytest.raises(DonatedStateError, match="donated"):
        _ = state.params
    with pytest.raises(DonatedStateError):
        step(state, batch())
    step(new_state, batch())


def test_without_donation_the_step_is_pure() -> None:
    state, step = build(optim.adamw(1e-2), donate=False)
    before = {n: p.clone() for n, p in state.params.items()}
    s1, m1 = step(state, batch())
    s2, m2 = step(state, batch())
    for n, p in state.params.items():
        assert torch.equal(p, before[n])
        assert torch.equal(s1.params[n], s2.params[n])
    assert torch.equal(m1["loss"], m2["loss"])


def test_donated_and_pure_paths_agree() -> None:
    a, step_a = build(optim.adamw(1e-2), donate=True)
    b, step_b = build(optim.adamw(1e-2), donate=False)
    for i in range(3):
        a, _ = step_a(a, batch(seed=i))
        b, _ = step_b(b, batch(seed=i))
    # The fused kernel rounds differently; Adam turns that into updates of up to ~1e-3 * lr.
    for n in a.params:
        torch.testing.assert_close(a.params[n], b.params[n], atol=1e-5, rtol=0)


def test_gradient_accumulation_equals_one_big_batch() -> None:
    one, step1 = build(optim.sgd(0.5))
    four, step4 = build(optim.sgd(0.5), grad_accum=4)
    for i in range(3):
        one, m1 = step1(one, batch(seed=i))
        four, m4 = step4(four, batch(seed=i))
        assert abs(m1["loss"].item() - m4["loss"].item()) < 1e-6
    for n in one.params:
        torch.testing.assert_close(one.params[n], four.params[n], atol=1e-6, rtol=0)


def test_batch_not_divisible_by_grad_accum_is_a_clear_error() -> None:
    state, step = build(optim.sgd(0.1), grad_accum=3)
    with pytest.raises(ValueError, match="not divisible by gradient_accumulation_steps=3"):
        step(state, batch(n=8))


def _poisoned_loss(model, b):
    x, y, factor = b
    return cross_entropy_loss(model, (x, y)) * factor[0]


def test_non_finite_gradients_skip_the_step_and_do_not_advance_the_schedule() -> None:
    sched = optim.schedules.linear_schedule(1e-2, 0.0, 10)
    opt = optim.adamw(sched)
    torch.manual_seed(0)
    model = GPT(CFG)
    plan = build_plan(model, stage=0)
    params, buffers = extract_tensors(model, plan.spec)
    state = init_state(plan, opt, params, buffers)
    step = make_train_step(_poisoned_loss, opt, plan, donate=False)
    x, y = batch()
    ok = torch.ones(8)
    state, m = step(state, (x, y, ok))
    assert m["skipped"].item() == 0
    lr_before = opt.learning_rate(state.opt_state).item()
    bad_state, m = step(state, (x, y, torch.full((8,), float("inf"))))
    assert m["skipped"].item() == 1 and bad_state.skipped.item() == 1
    for n in state.params:
        assert torch.equal(bad_state.params[n], state.params[n])
    for (path, a), (_, b) in zip(
        tree.leaves_with_path(bad_state.opt_state), tree.leaves_with_path(state.opt_state)
    ):
        assert torch.equal(a, b), path
    assert opt.learning_rate(bad_state.opt_state).item() == lr_before
    assert bad_state.step.item() == state.step.item() + 1


def test_bf16_keeps_fp32_master_and_fp32_loss() -> None:
    state, step = build(optim.adamw(1e-2), precision="bf16")
    assert state.params["wte.weight"].dtype == torch.bfloat16
    assert state.master["wte.weight"].dtype == torch.float32
    state, m = step(state, batch())
    assert m["loss"].dtype == torch.float32
    # A bf16-quantised loss would be a multiple of 2**-5 around 3.6.
    assert (m["loss"] * 32) % 1 != 0


def test_fp16_uses_dynamic_loss_scale_and_halves_it_on_overflow() -> None:
    ls = LossScaleConfig(dynamic=True, init_scale=2.0**10, hysteresis=1)
    torch.manual_seed(0)
    model = GPT(CFG)
    plan = build_plan(model, stage=0, precision="fp16")
    params, buffers = extract_tensors(model, plan.spec)
    opt = optim.adamw(1e-3)
    state = init_state(plan, opt, params, buffers, loss_scale=ls)
    step = make_train_step(_poisoned_loss, opt, plan, loss_scale=ls)
    x, y = batch()
    state, m = step(state, (x, y, torch.ones(8)))
    assert m["loss_scale"].item() == 2.0**10 and m["skipped"].item() == 0
    state, m = step(state, (x, y, torch.full((8,), 1e30)))
    assert m["skipped"].item() == 1
    assert state.loss_scale.scale.item() == 2.0**9


def test_dropout_is_reproducible_from_the_state_rng() -> None:
    cfg = dataclasses.replace(CFG, dropout=0.5)
    a, step = build(optim.sgd(0.1), cfg=cfg, donate=False)
    a1, ma = step(a, batch())
    a2, mb = step(a, batch())
    assert torch.equal(ma["loss"], mb["loss"])
    c, step_c = build(optim.sgd(0.1), cfg=cfg, seed=1, donate=False)
    _, mc = step_c(c, batch())
    assert not torch.equal(ma["loss"], mc["loss"])
    assert not torch.equal(a1.rng, a.rng)  # the state's RNG advanced


def test_buffers_are_updated_functionally() -> None:
    cfg = dataclasses.replace(CFG, batch_norm=True)
    state, step = build(optim.sgd(0.1), cfg=cfg, donate=False)
    new, _ = step(state, batch())
    assert torch.equal(state.buffers["bn.running_mean"], torch.zeros(16))
    assert not torch.equal(new.buffers["bn.running_mean"], torch.zeros(16))
    assert new.buffers["bn.num_batches_tracked"].item() == 1
