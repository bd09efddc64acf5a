"""funczero.config.optimizer: the optimizer and scheduler blocks, checked down to each value."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from funczero.config import Config, ConfigError, ConfigWarning, SchedulerConfig
from funczero.config.keys import SCHEDULER_PARAMS
from funczero.from_config import schedule_from_config


def load(d: dict[str, Any], world_size: int = 1) -> Config:
    return Config.load(d, world_size=world_size)


def error_of(d: dict[str, Any], world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        load(d, world_size)
    return str(info.value)


@pytest.mark.parametrize(
    ("block", "algorithm"),
    [
        ({"type": "Adam", "params": {"lr": 0.1}}, "adamw"),
        ({"type": "adam", "params": {"lr": 0.1, "adam_w_mode": False}}, "adam"),
        ({"type": "ADAMW", "params": {"lr": 0.1, "torch_adam": False}}, "adamw"),
        ({"type": "Lamb", "params": {"lr": 0.1}}, "lamb"),
        ({"type": "lion", "params": {"lr": 0.1}}, "lion"),
        ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}, "sgd"),
        ({"type": "Adagrad", "params": {"weight_decay": 0.01}}, "adagrad"),
    ],
)
def test_optimizer_types_match_case_insensitively(block: dict[str, Any], algorithm: str) -> None:
    cfg = load({"train_batch_size": 8, "optimizer": block})
    assert cfg.optimizer is not None and cfg.optimizer.algorithm == algorithm


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ({"type": "Adamw8bit"}, "did you mean 'AdamW'?"),
        ({"type": "RMSprop"}, "DeepSpeed would build torch.optim.RMSprop"),
        ({"type": "OneBitAdam"}, "OneBitAdam is not supported by funczero"),
        ({"type": "__class__"}, "optimizer.type \"__class__\" is not a known optimizer"),
        ({"params": {"lr": 1e-3}}, "optimizer.type is missing"),
        ({"type": "Adam", "params": {"lr": 1e-3, "max_grad_norm": 1.0}},
         'top-level "gradient_clipping"'),
        ({"type": "Adam", "params": {"amsgrad": True}},
         "optimizer.params.amsgrad=true is not supported by funczero"),
        ({"type": "SGD", "params": {"momentum": 0.9}}, None),
        ({"type": "SGD", "params": {"nesterov": True}}, "needs momentum > 0"),
        ({"type": "Adam", "params": {"momentum": 0.9}}, "valid keys here: adam_w_mode"),
        ({"type": "Adam", "params": {"betas": [0.9]}}, "optimizer.params.betas: expected a list"),
        ({"type": "Adam", "params": {"lr": -1e-3}},
         "optimizer.params.lr: expected a number >= 0, got -0.001"),
        ({"type": "Adam", "params": {"betas": [0.9, 10**400]}},
         "optimizer.params.betas: expected a list of two numbers in [0, 1)"),
    ],
)
def test_optimizer_block_errors(block: dict[str, Any], needle: str | None) -> None:
    config = {"train_batch_size": 8, "optimizer": block}
    if needle is None:
        load(config)
    else:
        assert needle in error_of(config)


def test_adamw_with_adam_w_mode_false_warns_and_stays_decoupled() -> None:
    with pytest.warns(ConfigWarning, match="always decouples weight decay"):
        cfg = load({"train_batch_size": 8,
                    "optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}})
    assert cfg.optimizer is not None and cfg.optimizer.algorithm == "adamw"


# --- scheduler -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"warmup_max_lr": -0.1},
         ("scheduler.params.warmup_max_lr: expected null or a number >= 0 and <= 3.40282e+38, "
         "got -0.1")),
        ({"warmup_min_lr": -1}, "scheduler.params.warmup_min_lr: expected a number >= 0"),
        ({"warmup_max_lr": 1e39}, "got 1e+39"),
        ({"warmup_num_steps": 1e308}, ("scheduler.params.warmup_num_steps: expected an integer "
                                      ">= 0 that fits in int64")),
        ({"warmup_num_steps": 10.5}, "scheduler.params.warmup_num_steps: expected an integer >= 0"),
        ({"warmup_num_steps": -1},
         "scheduler.params.warmup_num_steps: expected an integer >= 0, got -1"),
        ({"warmup_type": "cosine"},
         'scheduler.params.warmup_type: expected one of "log", "linear", got "cosine"'),
        ({"last_batch_iteration": 5}, "last_batch_iteration must be -1"),
    ],
)
def test_scheduler_values_that_cannot_train_are_errors(params: dict[str, Any], needle: str) -> None:
    assert needle in error_of({"train_batch_size": 8, "scheduler": {
        "type": "WarmupLR", "params": params}})


@pytest.mark.parametrize(
    ("type_", "params", "needle"),
    [
        ("OneCycle", {"cycle_min_lr": -0.1, "cycle_max_lr": 0.1},
         "scheduler.params.cycle_min_lr: expected a number >= 0"),
        ("OneCycle", {"cycle_min_lr": 0.0, "cycle_max_lr": 0.1, "cycle_max_mom": 1.5},
         "scheduler.params.cycle_max_mom: expected a number >= 0 and < 1, got 1.5"),
        ("OneCycle", {"cycle_min_lr": 0.0, "cycle_max_lr": 0.1, "decay_lr_rate": -1},
         "scheduler.params.decay_lr_rate: expected a number >= 0"),
        ("OneCycle", {"cycle_max_lr": 0.1}, "missing required parameter(s) ['cycle_min_lr']"),
        ("WarmupCosineLR", {"total_num_steps": 10, "warmup_min_ratio": -0.5},
         "scheduler.params.warmup_min_ratio: expected a number >= 0"),
        ("LRRangeTest", {"lr_range_test_step_rate": -1},
         "scheduler.params.lr_range_test_step_rate: expected a number >= 0"),
        ("WarmupDecayLR", {"total_num_steps": 0},
         "scheduler.params.total_num_steps: expected an integer >= 1, got 0"),
        ("WarmupDecayLR", {"total_num_steps": 1e308},
         "scheduler.params.total_num_steps: expected an integer >= 1 that fits in int64"),
    ],
)
def test_every_schedule_checks_its_values(
    type_: str, params: dict[str, Any], needle: str
) -> None:
    assert needle in error_of({"train_batch_size": 8, "scheduler": {
        "type": type_, "params": params}})


def test_scheduler_values_are_normalised_so_the_saved_config_reloads() -> None:
    cfg = load({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                "scheduler": {"type": "WarmupDecayLR", "params": {
                    "total_num_steps": 1e3, "warmup_num_steps": 10.0, "warmup_type": "LINEAR",
                    "warmup_max_lr": 1}}})
    assert cfg.scheduler == SchedulerConfig("WarmupDecayLR", {
        "total_num_steps": 1000, "warmup_num_steps": 10, "warmup_type": "linear",
        "warmup_max_lr": 1.0})
    assert Config.load(cfg.to_dict(), world_size=1) == cfg


@pytest.mark.parametrize("type_", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
def test_zero_warmup_steps_is_deepspeeds_two_step_warmup(type_: str) -> None:
    # DeepSpeed warms up over max(2, warmup_num_steps) steps; 0 is the HF Trainer's default.
    params = {"warmup_type": "linear", "total_num_steps": 10}
    if type_ == "WarmupLR":
        del params["total_num_steps"]
    schedules = [
        schedule_from_config(load({"train_batch_size": 8, "scheduler": {
            "type": type_, "params": {**params, "warmup_num_steps": steps}}}), base_lr=1.0)[0]
        for steps in (0, 1, 2)
    ]
    zero = load({"train_batch_size": 8, "scheduler": {
        "type": type_, "params": {**params, "warmup_num_steps": 0}}})
    assert zero.scheduler is not None and zero.scheduler.params["warmup_num_steps"] == 1
    assert Config.load(zero.to_dict(), world_size=1) == zero
    counts = torch.arange(12)
    for schedule in schedules:
        assert callable(schedule)
        torch.testing.assert_close(schedule(counts), schedules[2](counts), rtol=0, atol=0)


def test_every_schedule_parameter_has_a_value_check() -> None:
    from funczero.optim.deepspeed_schedules import DEEPSPEED_SCHEDULES

    names = {name for params in DEEPSPEED_SCHEDULES.values() for name in params}
    assert names | {"last_batch_iteration"} == set(SCHEDULER_PARAMS)


def test_scheduler_type_is_case_sensitive_with_a_suggestion() -> None:
    assert "did you mean 'WarmupLR'?" in error_of(
        {"train_batch_size": 8, "scheduler": {"type": "warmuplr"}})
