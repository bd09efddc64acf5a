"""funczero.config.schema and keys: every key is checked, every mistake names its path and fix."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from funczero.config import Config, ConfigError, ConfigWarning
from funczero.config.errors import MAX_SHOWN


def load(d: dict[str, Any], world_size: int = 1) -> Config:
    return Config.load(d, world_size=world_size)


def error_of(d: dict[str, Any], world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        load(d, world_size)
    return str(info.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"gradient_clippin": 1.0},
         "unknown key 'gradient_clippin'; did you mean 'gradient_clipping'?"),
        ({"zero_optimization": {"stage3_prefetch_bucket_sise": 1}},
         ("unknown key 'zero_optimization.stage3_prefetch_bucket_sise'; "
         "did you mean 'stage3_prefetch_bucket_size'?")),
        ({"fp16": {"enabled": True, "initial_scale_pow": 8}},
         "unknown key 'fp16.initial_scale_pow'; did you mean 'initial_scale_power'?"),
        ({"zero_optimization": {"offload_param": {"device": "none", "pin_memroy": True}}},
         "unknown key 'zero_optimization.offload_param.pin_memroy'; did you mean 'pin_memory'?"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decy": 0.1}}},
         "unknown key 'optimizer.params.weight_decy'; did you mean 'weight_decay'?"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}},
         "unknown key 'scheduler.params.warmup_num_step'; did you mean 'warmup_num_steps'?"),
        ({"bf16": {"enabled": True, "loss_scale": 0}},
         "unknown key 'bf16.loss_scale'; 'loss_scale' belongs in the 'fp16' block"),
        ({"stage": 2}, "unknown key 'stage'; 'stage' belongs in the 'zero_optimization' block"),
        ({"gradient_clipping": "1.0x"}, 'gradient_clipping: expected a number >= 0, got "1.0x"'),
        ({"gradient_clipping": -1}, "gradient_clipping: expected a number >= 0, got -1"),
        ({"zero_optimization": {"stage": 4}},
         "zero_optimization.stage: expected an integer >= 0 and <= 3, got 4"),
        ({"zero_optimization": {"stage": True}},
         "zero_optimization.stage: expected an integer >= 0 and <= 3, got true"),
        ({"zero_optimization": {"reduce_bucket_size": 5.5}},
         "zero_optimization.reduce_bucket_size: expected an integer >= 0, got 5.5"),
        ({"fp16": {"enabled": 1}}, "fp16.enabled: expected true or false, got 1"),
        ({"fp16": {"hysteresis": 0}}, "fp16.hysteresis: expected an integer >= 1, got 0"),
        ({"communication_data_type": "float64"},
         'communication_data_type: expected one of null, "fp32", "fp16", "bf16", got "float64"'),
        ({"fp16": []}, "fp16: expected an object, got []"),
        ({"zero_optimization": {"reduce_bucket_size": 1e19}},
         ("zero_optimization.reduce_bucket_size: expected an integer >= 0 that fits in int64 "
         "(-2**63 to 2**63 - 1), got 1e+19")),
        ({"zero_optimization": {"reduce_bucket_size": 10**309}},
         ("zero_optimization.reduce_bucket_size: expected an integer >= 0 that fits in int64 "
         "(-2**63 to 2**63 - 1), got an integer of about 310 digits")),
        ({"gradient_clipping": 10**309},
         "gradient_clipping: expected a number >= 0, got an integer of about 310 digits"),
        ({"fp16": {"loss_scale": 1e39}},
         "fp16.loss_scale: expected a number >= 0 and <= 1.70141e+38, got 1e+39"),
        ({"zero_optimization": {"stage3_module_granularity_threshold": -(10**30)}},
         ("zero_optimization.stage3_module_granularity_threshold: expected an integer that fits "
         "in int64 (-2**63 to 2**63 - 1), got -1000000000000000000000000000000")),
        ({"k" * 5000: 1}, "unknown key '\"" + "k" * 100 + "...\"' (see docs/config.md for the "
         "keys accepted here)"),
        ({"a\nb": 1}, "unknown key '\"a\\nb\"' (see docs/config.md for the keys accepted here)"),
    ],
)
def test_mistakes_name_the_key_path(config: dict[str, Any], message: str) -> None:
    assert error_of({"train_batch_size": 8, **config}) == message


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load({"train_batch_size": 8, "gradient_clippin": 1, "fp16": {"hysteresis": 0},
              "zero_optimization": {"stage": 9}})
    assert len(info.value.problems) == 3
    assert str(info.value).startswith("3 problems in the config:")


def test_thousands_of_problems_are_all_kept_but_the_message_stays_short() -> None:
    with pytest.raises(ConfigError) as info:
        load({"train_batch_size": 8, **{f"unknown_{i}": i for i in range(5000)}})
    assert len(info.value.problems) == 5000
    assert info.value.problems[0] == "unknown key 'unknown_0' (see docs/config.md for the keys " \
                                     "accepted here)"
    message = str(info.value)
    assert message.count("\n  - ") == MAX_SHOWN and message.endswith(
        f"... and {5000 - MAX_SHOWN} more (see .problems)")


def test_integral_floats_are_accepted_for_counts() -> None:
    cfg = load({"train_batch_size": 8, "zero_optimization": {"reduce_bucket_size": 2e8}})
    assert cfg.zero.reduce_bucket_size == 200_000_000
    assert isinstance(cfg.zero.reduce_bucket_size, int)


# --- "auto" ----------------------------------------------------------------------------------

def test_auto_resolves_where_computable() -> None:
    cfg = load({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto",
                                                     "warmup_max_lr": "auto",
                                                     "warmup_num_steps": 10}},
        "fp16": {"enabled": True, "loss_scale_window": "auto"},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto"},
    }, world_size=2)
    assert cfg.train_batch_size == 16
    assert cfg.optimizer is not None
    assert cfg.optimizer.params["betas"] == (0.9, 0.999) and cfg.optimizer.params["eps"] == 1e-8
    assert cfg.scheduler is not None
    assert cfg.scheduler.params == {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-4,
                                    "warmup_num_steps": 10}
    assert cfg.fp16.loss_scale_window == 1000
    assert cfg.zero.reduce_bucket_size == 500_000_000
    assert cfg.zero.stage3_prefetch_bucket_size == 50_000_000


@pytest.mark.parametrize(
    ("config", "line"),
    [
        ({"gradient_clipping": "auto"}, "gradient_clipping: max_grad_norm="),
        ({"fp16": {"enabled": "auto"}},
         "fp16.enabled: fp16= or bf16= (giving one makes the other false)"),
        ({"bfloat16": {"enabled": "auto"}},
         "bf16.enabled: bf16= or fp16= (giving one makes the other false)"),
        ({"optimizer": {"type": "Adam", "params": {"lr": "auto"}}},
         "optimizer.params.lr: learning_rate="),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}},
         "scheduler.params.total_num_steps: num_training_steps="),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}},
         ("scheduler.params.warmup_num_steps: warmup_steps=, or warmup_ratio= with "
         "num_training_steps=")),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}},
         ("scheduler.params.warmup_max_lr: learning_rate= (or add an optimizer block: its lr is "
         "then the value)")),
        ({"amp": {"enabled": "auto", "opt_level": "auto"}},
         ("amp.enabled: any auto_values_from_trainer_args(...) call gives false; or write "
         '"enabled": false')),
    ],
)
def test_auto_that_needs_a_value_is_one_problem_naming_what_fills_it(
    config: dict[str, Any], line: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load({"train_batch_size": 8, **config})
    assert info.value.problems == [
        ('1 "auto" value that only the HF Trainer fills in got no value. Pass Config.load(..., '
        "auto=funczero.config.auto_values_from_trainer_args(...)) with these arguments, or write "
        f"concrete values in the config:\n  {line}")
    ]


def test_auto_where_deepspeed_never_accepted_it_is_a_bad_value() -> None:
    assert error_of({"train_batch_size": 8, "steps_per_print": "auto"}) == (
        'steps_per_print: expected null or an integer >= 1, got "auto"')
    assert error_of({"train_batch_size": 8, "scheduler": {"type": "OneCycle", "params": {
        "cycle_min_lr": "auto", "cycle_max_lr": 0.1}}}) == (
        'scheduler.params.cycle_min_lr is "auto", but no HF Trainer fills this key ("auto" is '
        "not one of its values); set a number >= 0 and <= 3.40282e+38")


def test_auto_scheduler_lr_with_a_broken_optimizer_block_blames_that_block() -> None:
    with pytest.raises(ConfigError) as info:
        load({"train_batch_size": 8,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9]}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}})
    assert info.value.problems[0].startswith("optimizer.params.betas: expected a list of two")
    assert info.value.problems[1] == (
        'scheduler.params.warmup_max_lr is "auto", which means the optimizer\'s lr, but the '
        "optimizer block has errors (listed with it); fix them or set a concrete value"
    )
    assert "no optimizer block" not in str(info.value)


def test_auto_scheduler_lr_with_an_auto_optimizer_lr_lists_only_the_optimizer_lr() -> None:
    # The misleading "there is no optimizer block" of issue 11: the lr fills both.
    with pytest.raises(ConfigError) as info:
        load({"train_batch_size": 8,
              "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].endswith("config:\n  optimizer.params.lr: learning_rate=")
    cfg = Config.load({"train_batch_size": 8,
                       "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                       "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}},
                      world_size=1, auto={"optimizer.params.lr": 0.25})
    assert cfg.optimizer is not None and cfg.optimizer.lr == 0.25
    assert cfg.scheduler is not None and cfg.scheduler.params["warmup_max_lr"] == 0.25


# --- accepted but ignored --------------------------------------------------------------------

def test_ignored_keys_warn_only_when_set_to_something_else() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load({"train_batch_size": 8, "zero_optimization": {"round_robin_gradients": False}})
    with pytest.warns(ConfigWarning, match="round_robin_gradients=true has no effect"):
        load({"train_batch_size": 8, "zero_optimization": {"round_robin_gradients": True}})


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"bf16": {"enabled": True, "check_grad_overflow": False}},
         "funczero always skips a step whose gradients hold inf/nan"),
        ({"prescale_gradients": True}, "moving the division is not implemented"),
        ({"gradient_predivide_factor": 2.0}, "a pre-division factor is not implemented"),
        ({"zero_allow_untested_optimizer": True}, "nothing to allow"),
        ({"fp16": {"auto_cast": True}}, "funczero does not cast the batch"),
    ],
)
def test_keys_without_effect_say_so_when_set(config: dict[str, Any], needle: str) -> None:
    with pytest.warns(ConfigWarning, match="has no effect in funczero") as record:
        load({"train_batch_size": 8, **config})
    assert needle in str(record[0].message)


def test_steps_per_print_and_wall_clock_breakdown_load_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load({"train_batch_size": 8, "steps_per_print": 50}).steps_per_print == 50
        assert load({"train_batch_size": 8, "wall_clock_breakdown": True}).monitors.wall_clock_breakdown
