"""funczero.from_config: the runtime objects a Config describes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from funczero import optim
from funczero.config import Config, ConfigError, ConfigWarning
from funczero.from_config import (
    loss_scale_from_config,
    optimizer_from_config,
    precision_from_config,
    schedule_from_config,
)
from funczero.train.loss_scale import LossScaleConfig


def load(d: dict[str, Any], world_size: int = 1) -> Config:
    return Config.load(d, world_size=world_size)


def test_loss_scale_and_precision_follow_the_precision_blocks() -> None:
    cfg = load({"train_batch_size": 8, "fp16": {"enabled": True}, "funczero": {
        "raise_at_min_loss_scale": True}})
    assert loss_scale_from_config(cfg) == LossScaleConfig(init_scale=2.0**16,
                                                          raise_at_min_scale=True)
    assert loss_scale_from_config(load({"train_batch_size": 8})) == LossScaleConfig.disabled()
    assert precision_from_config(cfg).compute_dtype == torch.float16
    bf16 = load({"train_batch_size": 8, "bf16": {"enabled": True},
                 "communication_data_type": "bf16"})
    assert precision_from_config(bf16).compute_dtype == torch.bfloat16
    assert precision_from_config(bf16).reduce_dtype == torch.bfloat16


def test_every_accepted_fp16_block_builds_a_loss_scaler() -> None:
    for fp16 in ({"loss_scale": 2.0**127}, {"min_loss_scale": 2.0**127, "initial_scale_power": 127},
                 {"loss_scale": 1e-30}, {"hysteresis": 10**18, "loss_scale_window": 10**18}):
        cfg = load({"train_batch_size": 8, "fp16": {"enabled": True, **fp16}})
        loss_scale_from_config(cfg)


@pytest.mark.parametrize(
    ("block", "factory_call"),
    [
        ({"type": "Adam", "params": {"lr": 0.1}},
         lambda: optim.adamw(0.1, 0.9, 0.999, 1e-8, weight_decay=0.0)),
        ({"type": "adam", "params": {"lr": 0.1, "adam_w_mode": False, "weight_decay": 0.1}},
         lambda: optim.adam(0.1, 0.9, 0.999, 1e-8, weight_decay=0.1)),
        ({"type": "ADAMW", "params": {"lr": 0.1, "torch_adam": False}},
         lambda: optim.adamw(0.1, weight_decay=0.0)),
        ({"type": "Lamb", "params": {"lr": 0.1, "max_coeff": 5.0}},
         lambda: optim.lamb(0.1, 0.9, 0.999, 1e-8, max_coeff=5.0)),
        ({"type": "lion", "params": {"lr": 0.1, "weight_decay": 0.5}},
         lambda: optim.lion(0.1, 0.9, 0.999, weight_decay=0.5)),
        ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
         lambda: optim.sgd(0.1, 0.9, nesterov=True)),
        ({"type": "Adagrad", "params": {"weight_decay": 0.01}},
         lambda: optim.adagrad(1e-2, eps=1e-10, weight_decay=0.01)),
    ],
)
def test_optimizer_builds_the_funczero_equivalent_with_deepspeed_defaults(
    block: dict[str, Any], factory_call: Any
) -> None:
    cfg = load({"train_batch_size": 8, "optimizer": block})
    params = {"w": torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)}
    grads = {"w": torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5, -0.7], dtype=torch.float64)}
    results = []
    for opt in (optimizer_from_config(cfg), factory_call()):
        state = opt.init(params)
        for _ in range(3):
            updates, state = opt.update(grads, state, params)
        results.append(updates["w"])
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_scheduler_drives_the_learning_rate() -> None:
    cfg = load({"train_batch_size": 8,
                "optimizer": {"type": "AdamW", "params": {"lr": 1.0}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4,
                                                             "warmup_type": "linear"}}})
    opt = optimizer_from_config(cfg)
    params = {"w": torch.zeros(2)}
    state = opt.init(params)
    seen = []
    for _ in range(6):
        seen.append(float(opt.learning_rate(state)))
        _, state = opt.update({"w": torch.ones(2)}, state, params)
    assert seen == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75, 1.0])
    lr, momentum = schedule_from_config(cfg)
    assert momentum is None and float(lr(torch.tensor(5))) == pytest.approx(1.0)


def test_schedule_for_a_client_optimizer_needs_its_base_lr() -> None:
    cfg = load({"train_batch_size": 8, "scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError, match="no optimizer block, so pass base_lr="):
        schedule_from_config(cfg)
    lr, _ = schedule_from_config(cfg, base_lr=0.5)
    assert float(lr(torch.tensor(10**6))) == pytest.approx(0.5)
    assert schedule_from_config(load({"train_batch_size": 8}), base_lr=0.5) == (0.5, None)


def test_one_cycle_momentum_is_ignored_for_sgd_with_a_warning() -> None:
    cfg = load({"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.01,
                                                             "cycle_max_lr": 0.1}}})
    with pytest.warns(ConfigWarning, match="momentum cycling is ignored") as record:
        optimizer_from_config(cfg)
    assert record[0].filename == __file__  # attributed to the caller, not to funczero


def test_optimizer_without_block_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"Add one.*funczero\.initialize\(optimizer=") as info:
        optimizer_from_config(load({"train_batch_size": 8}))
    assert "no \"optimizer\" block" in str(info.value)


# --- funczero.no_decay_for_norms_and_biases ----------------------------------------------------

SHAPES = {"embed.weight": (6, 4), "fc.weight": (3, 4), "fc.bias": (3,), "ln.weight": (4,),
          "ln.bias": (4,)}


def masked_config(block: dict[str, Any], switch: bool = True) -> Config:
    return load({"train_batch_size": 8, "optimizer": block,
                 "funczero": {"no_decay_for_norms_and_biases": switch}})


def test_no_decay_switch_matches_torch_adamw_param_groups_on_zero_shards() -> None:
    # ZeRO-3 at world 1: the optimizer holds each parameter as one flat 1-D shard, so only the
    # global shapes can tell a bias from a matrix.
    torch.manual_seed(0)
    full = {n: torch.randn(s, dtype=torch.float64) for n, s in SHAPES.items()}
    grads = [{n: torch.randn(s, dtype=torch.float64) for n, s in SHAPES.items()}
             for _ in range(4)]
    cfg = masked_config({"type": "AdamW", "params": {"lr": 0.1, "betas": [0.8, 0.9],
                                                     "eps": 1e-6, "weight_decay": 0.3}})
    opt = optimizer_from_config(cfg, shapes=SHAPES)
    shards = {n: p.reshape(-1).clone() for n, p in full.items()}
    state = opt.init(shards)
    for g in grads:
        state = opt.update_({n: t.reshape(-1) for n, t in g.items()}, state, shards)

    reference = {n: p.clone().requires_grad_() for n, p in full.items()}
    decayed = [reference[n] for n in ("embed.weight", "fc.weight")]
    kept = [reference[n] for n in ("fc.bias", "ln.weight", "ln.bias")]
    torch_opt = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.3}, {"params": kept, "weight_decay": 0.0}],
        lr=0.1, betas=(0.8, 0.9), eps=1e-6, foreach=False,
    )
    for g in grads:
        for n, p in reference.items():
            p.grad = g[n].clone()
        torch_opt.step()
    for n, p in reference.items():
        torch.testing.assert_close(shards[n].reshape(p.shape), p.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "block",
    [{"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.5}},
     {"type": "Adam", "params": {"lr": 0.1, "weight_decay": 0.5, "adam_w_mode": False}},
     {"type": "Lamb", "params": {"lr": 0.1, "weight_decay": 0.5}},
     {"type": "Lion", "params": {"lr": 0.1, "weight_decay": 0.5}},
     {"type": "SGD", "params": {"lr": 0.1, "weight_decay": 0.5}},
     {"type": "Adagrad", "params": {"lr": 0.1, "weight_decay": 0.5}}],
    ids=lambda block: block["type"] + ("-L2" if "adam_w_mode" in block["params"] else ""),
)
def test_no_decay_switch_leaves_1d_parameters_undecayed_for_every_type(
    block: dict[str, Any]
) -> None:
    # With zero gradients every change is weight decay.
    for switch in (True, False):
        opt = optimizer_from_config(masked_config(block, switch), shapes=SHAPES)
        params = {n: torch.ones(s, dtype=torch.float64).reshape(-1) for n, s in SHAPES.items()}
        state = opt.init(params)
        opt.update_({n: torch.zeros_like(p) for n, p in params.items()}, state, params)
        changed = {n for n, p in params.items() if not torch.equal(p, torch.ones_like(p))}
        assert changed == ({"embed.weight", "fc.weight"} if switch else set(SHAPES)), switch


def test_no_decay_switch_needs_the_global_shapes() -> None:
    cfg = masked_config({"type": "AdamW", "params": {"weight_decay": 0.1}})
    with pytest.raises(ValueError, match=r"pass shapes=plan\.spec\.shapes") as info:
        optimizer_from_config(cfg)
    assert "funczero.no_decay_for_norms_and_biases is true" in str(info.value)
    assert load({"train_batch_size": 8}).funczero.no_decay_for_norms_and_biases is False
    with pytest.raises(ValueError, match=r"shapes\['fc\.bias'\]=\(2,\) cannot be the global"):
        optimizer_from_config(cfg, shapes={**SHAPES, "fc.bias": (2,)}).init(
            {"fc.bias": torch.zeros(3)})
