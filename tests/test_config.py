"""funczero.config: DeepSpeed configs load unchanged; every mistake is a precise error."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from funczero import optim
from funczero.config import (
    KEYS,
    OPTIMIZER_PARAMS,
    BF16Config,
    Config,
    ConfigError,
    ConfigWarning,
    FP16Config,
    FunczeroConfig,
    Status,
    ZeroConfig,
)
from funczero.config.reference import render
from funczero.train.loss_scale import LossScaleConfig

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def load(d: dict[str, Any], world_size: int = 1) -> Config:
    return Config.load(d, world_size=world_size)


def error_of(d: dict[str, Any], world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        load(d, world_size)
    return str(info.value)


# --- DeepSpeed configs as users write them ---------------------------------------------------

ZERO3_FILE = """\
// ZeRO-3 config from a fine-tuning recipe
{
  "train_micro_batch_size_per_gpu": 2,
  "gradient_accumulation_steps": 8,   # hjson-style comment
  "gradient_clipping": 1.0,
  "steps_per_print": 100,
  "wall_clock_breakdown": false,
  /* mixed precision */
  "bf16": {"enabled": true},
  "optimizer": {
    "type": "AdamW",
    "params": {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
  },
  "scheduler": {
    "type": "WarmupDecayLR",
    "params": {"warmup_min_lr": 0, "warmup_max_lr": 2e-5, "warmup_num_steps": 100,
               "total_num_steps": 1000}
  },
  "zero_optimization": {
    "stage": 3,
    "overlap_comm": true,
    "contiguous_gradients": true,
    "reduce_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "stage3_gather_16bit_weights_on_model_save": true,
    "offload_optimizer": {"device": "none"},
    "offload_param": {"device": "none", "pin_memory": true},
    "sub_group_size": 1e9
  },
  "tensorboard": {"enabled": false, "output_path": "logs/"},
  "activation_checkpointing": {"partition_activations": false},
  "comment": "a URL like http://x/*y* inside a string is not a comment"
}
"""


def test_deepspeed_zero3_file_with_comments_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(ZERO3_FILE.replace('  "comment": "a URL like http://x/*y* inside a string '
                                       'is not a comment"\n', '  "dump_state": false\n'))
    cfg = Config.load(path, world_size=4)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu,
            cfg.gradient_accumulation_steps) == (64, 2, 8)
    assert cfg.precision == "bf16" and cfg.zero.stage == 3 and cfg.zero.overlap_comm
    assert cfg.zero.stage3_prefetch_bucket_size == 50_000_000
    assert cfg.zero.stage3_gather_16bit_weights_on_model_save is True
    assert cfg.optimizer is not None and cfg.optimizer.params["betas"] == (0.9, 0.95)
    assert cfg.scheduler is not None and cfg.scheduler.type == "WarmupDecayLR"
    assert cfg.gradient_clipping == 1.0 and cfg.steps_per_print == 100
    assert Config.from_file(path, world_size=4) == cfg


def test_comment_markers_inside_strings_are_kept() -> None:
    from funczero.config.jsonc import loads

    text = '{"a": "http://x/*y*/ # z", "b": "\\"//", // c\n "c": [1, 2,], /* d */ }'
    assert loads(text) == {"a": "http://x/*y*/ # z", "b": '"//', "c": [1, 2]}


def test_duplicate_keys_are_named_with_their_path(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('{"train_batch_size": 8, "zero_optimization": {"stage": 1, "stage": 2}}')
    with pytest.raises(ConfigError, match=r"duplicate key 'zero_optimization\.stage'"):
        Config.load(path, world_size=1)


def test_json_syntax_error_points_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  // fine\n  "train_batch_size": 8\n  "fp16": {}\n}')
    with pytest.raises(ConfigError, match=r"line 4, column 3") as info:
        Config.load(path, world_size=1)
    assert '"fp16": {}' in str(info.value)


def test_base64_source_as_deepspeed_accepts() -> None:
    encoded = base64.urlsafe_b64encode(json.dumps({"train_batch_size": 16}).encode()).decode()
    assert Config.load(encoded, world_size=2).train_micro_batch_size_per_gpu == 8


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.json")


# --- batch sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("given", "world", "want"),
    [
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
          "gradient_accumulation_steps": 4}, 4, (64, 4, 4)),
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, 2, (64, 4, 8)),
        ({"train_batch_size": 64, "gradient_accumulation_steps": 4}, 2, (64, 8, 4)),
        ({"train_batch_size": 64}, 4, (64, 16, 1)),
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
        ({"train_micro_batch_size_per_gpu": 4}, 3, (12, 4, 1)),
        ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4,
          "gradient_accumulation_steps": 2}, 2, (16, 4, 2)),
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto"}, 2, (32, 16, 1)),
        ({"train_batch_size": 3.2e1}, 1, (32, 32, 1)),
    ],
)
def test_batch_keys_resolve_like_deepspeed(
    given: dict[str, Any], world: int, want: tuple[int, int, int]
) -> None:
    cfg = load(given, world)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu,
            cfg.gradient_accumulation_steps) == want
    assert cfg.world_size == world


@pytest.mark.parametrize(
    ("given", "world", "needles"),
    [
        ({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 4}, 3,
         ["100 / 12 = 8.333", "floor it to 8", "e.g. 96 or 108"]),
        ({"train_batch_size": 30, "gradient_accumulation_steps": 4}, 2,
         ["gradient_accumulation_steps (4) * world_size 2", "30 / 8", "e.g. 24 or 32"]),
        ({"train_batch_size": 10}, 4, ["not divisible by world_size 4", "e.g. 8 or 12"]),
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
          "gradient_accumulation_steps": 8}, 1, ["(64) != ", "= 32", "set train_batch_size to 32"]),
        ({"gradient_accumulation_steps": 4}, 1, ["give train_batch_size or"]),
        ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}, 1,
         ["give train_batch_size or"]),
        ({"train_batch_size": 0}, 1, ["train_batch_size: expected null or an integer >= 1, got 0"]),
    ],
)
def test_batch_errors_show_the_arithmetic_and_fix(
    given: dict[str, Any], world: int, needles: list[str]
) -> None:
    message = error_of(given, world)
    for needle in needles:
        assert needle in message, message


def test_world_size_defaults_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Config.load({"train_batch_size": 32}).train_micro_batch_size_per_gpu == 8
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=4 in the environment"):
        Config.load({"train_batch_size": 30})
    monkeypatch.delenv("WORLD_SIZE")
    assert Config.load({"train_batch_size": 30}).world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        Config.load({"train_batch_size": 30})


# --- strictness ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"gradient_clippin": 1.0},
         "unknown key 'gradient_clippin'; did you mean 'gradient_clipping'?"),
        ({"zero_optimization": {"stage3_prefetch_bucket_sise": 1}},
         "unknown key 'zero_optimization.stage3_prefetch_bucket_sise'; "
         "did you mean 'stage3_prefetch_bucket_size'?"),
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
    ("config", "needle"),
    [
        ({"gradient_clipping": "auto"}, 'gradient_clipping is "auto"'),
        ({"fp16": {"enabled": "auto"}}, 'fp16.enabled is "auto"'),
        ({"optimizer": {"type": "Adam", "params": {"lr": "auto"}}},
         'optimizer.params.lr is "auto"'),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}},
         'scheduler.params.total_num_steps is "auto"'),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}},
         "there is no optimizer block"),
        ({"steps_per_print": "auto"},
         'steps_per_print: expected null or an integer >= 1, got "auto"'),
    ],
)
def test_auto_that_needs_a_value_is_an_error(config: dict[str, Any], needle: str) -> None:
    assert needle in error_of({"train_batch_size": 8, **config})


# --- precision -------------------------------------------------------------------------------

def test_fp16_defaults_and_loss_scale_config() -> None:
    cfg = load({"train_batch_size": 8, "fp16": {"enabled": True}, "funczero": {
        "raise_at_min_loss_scale": True}})
    assert cfg.fp16 == FP16Config(enabled=True)
    assert (cfg.fp16.loss_scale, cfg.fp16.initial_scale_power, cfg.fp16.loss_scale_window,
            cfg.fp16.hysteresis, cfg.fp16.min_loss_scale) == (0.0, 16, 1000, 2, 1.0)
    assert cfg.loss_scale_config() == LossScaleConfig(init_scale=2.0**16, raise_at_min_scale=True)
    assert load({"train_batch_size": 8}).loss_scale_config() == LossScaleConfig.disabled()
    assert cfg.precision_policy().compute_dtype == torch.float16


def test_fp16_and_bf16_together_is_an_error() -> None:
    message = error_of({"train_batch_size": 8, "fp16": {"enabled": True},
                        "bfloat16": {"enabled": True}})
    assert "fp16.enabled and bfloat16.enabled are both true" in message


def test_bf16_legacy_name_and_defaults() -> None:
    cfg = load({"train_batch_size": 8, "bfloat16": {"enabled": True}})
    assert cfg.bf16 == BF16Config(enabled=True, check_grad_overflow=True)
    assert "'bf16' and 'bfloat16' are the same setting" in error_of(
        {"train_batch_size": 8, "bf16": {}, "bfloat16": {}})


def test_initial_scale_below_min_is_an_error() -> None:
    message = error_of({"train_batch_size": 8, "fp16": {"enabled": True,
                                                        "initial_scale_power": 0,
                                                        "min_loss_scale": 4}})
    assert "below min_loss_scale 4" in message


# --- optimizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("block", "algorithm", "factory_call"),
    [
        ({"type": "Adam", "params": {"lr": 0.1}}, "adamw",
         lambda: optim.adamw(0.1, 0.9, 0.999, 1e-8, weight_decay=0.0)),
        ({"type": "adam", "params": {"lr": 0.1, "adam_w_mode": False, "weight_decay": 0.1}},
         "adam", lambda: optim.adam(0.1, 0.9, 0.999, 1e-8, weight_decay=0.1)),
        ({"type": "ADAMW", "params": {"lr": 0.1, "torch_adam": False}}, "adamw",
         lambda: optim.adamw(0.1, weight_decay=0.0)),
        ({"type": "Lamb", "params": {"lr": 0.1, "max_coeff": 5.0}}, "lamb",
         lambda: optim.lamb(0.1, 0.9, 0.999, 1e-8, max_coeff=5.0)),
        ({"type": "lion", "params": {"lr": 0.1, "weight_decay": 0.5}}, "lion",
         lambda: optim.lion(0.1, 0.9, 0.999, weight_decay=0.5)),
        ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}, "sgd",
         lambda: optim.sgd(0.1, 0.9, nesterov=True)),
        ({"type": "Adagrad", "params": {"weight_decay": 0.01}}, "adagrad",
         lambda: optim.adagrad(1e-2, eps=1e-10, weight_decay=0.01)),
    ],
)
def test_optimizer_builds_the_funczero_equivalent_with_deepspeed_defaults(
    block: dict[str, Any], algorithm: str, factory_call: Any
) -> None:
    cfg = load({"train_batch_size": 8, "optimizer": block})
    assert cfg.optimizer is not None and cfg.optimizer.algorithm == algorithm
    params = {"w": torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)}
    grads = {"w": torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5, -0.7], dtype=torch.float64)}
    results = []
    for opt in (cfg.build_optimizer(), factory_call()):
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
    opt = cfg.build_optimizer()
    params = {"w": torch.zeros(2)}
    state = opt.init(params)
    seen = []
    for _ in range(6):
        seen.append(float(opt.learning_rate(state)))
        _, state = opt.update({"w": torch.ones(2)}, state, params)
    assert seen == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75, 1.0])
    lr, momentum = cfg.build_schedule()
    assert momentum is None and float(lr(torch.tensor(5))) == pytest.approx(1.0)


def test_one_cycle_momentum_is_ignored_for_sgd_with_a_warning() -> None:
    cfg = load({"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.01,
                                                             "cycle_max_lr": 0.1}}})
    with pytest.warns(ConfigWarning, match="momentum cycling is ignored"):
        cfg.build_optimizer()


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ({"type": "Adamw8bit"}, "did you mean 'AdamW'?"),
        ({"type": "RMSprop"}, "DeepSpeed would build torch.optim.RMSprop"),
        ({"type": "OneBitAdam"}, "OneBitAdam is not supported by funczero"),
        ({"params": {"lr": 1e-3}}, "optimizer.type is missing"),
        ({"type": "Adam", "params": {"lr": 1e-3, "max_grad_norm": 1.0}},
         'top-level "gradient_clipping"'),
        ({"type": "Adam", "params": {"amsgrad": True}},
         "optimizer.params.amsgrad=true is not supported by funczero"),
        ({"type": "SGD", "params": {"momentum": 0.9}}, None),
        ({"type": "SGD", "params": {"nesterov": True}}, "needs momentum > 0"),
        ({"type": "Adam", "params": {"momentum": 0.9}}, "valid keys here: adam_w_mode"),
        ({"type": "Adam", "params": {"betas": [0.9]}}, "optimizer.params.betas: expected a list"),
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


def test_build_optimizer_without_block_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"Add one.*funczero\.initialize\(optimizer=") as info:
        load({"train_batch_size": 8}).build_optimizer()
    assert "no \"optimizer\" block" in str(info.value)


# --- zero and the rest -------------------------------------------------------------------------

def test_overlap_comm_follows_deepspeed_code_default() -> None:
    assert load({"train_batch_size": 8, "zero_optimization": {"stage": 3}}).zero.overlap_comm
    assert not load({"train_batch_size": 8, "zero_optimization": {"stage": 2}}).zero.overlap_comm
    assert ZeroConfig(stage=3).overlap_comm is True


def test_legacy_and_deprecated_zero_forms() -> None:
    with pytest.warns(ConfigWarning, match="deprecated form"):
        cfg = load({"train_batch_size": 8, "zero_optimization": True, "allgather_size": 1e6})
    assert (cfg.zero.stage, cfg.zero.allgather_bucket_size) == (1, 1_000_000)
    with pytest.warns(ConfigWarning, match="renamed"):
        cfg = load({"train_batch_size": 8, "zero_optimization": {
            "stage": 3, "stage3_gather_fp16_weights_on_model_save": True}})
    assert cfg.zero.stage3_gather_16bit_weights_on_model_save is True
    assert "asks for CPU offload" in error_of(
        {"train_batch_size": 8, "zero_optimization": {"cpu_offload": True}})
    assert "are the same setting" in error_of({"train_batch_size": 8, "zero_optimization": {
        "max_live_parameters": 1, "stage3_max_live_parameters": 2}})
    cfg = load({"train_batch_size": 8, "zero_optimization": {"max_live_parameters": 7}})
    assert cfg.zero.stage3_max_live_parameters == 7


def test_unsupported_features_are_rejected_with_the_fix() -> None:
    assert error_of({"train_batch_size": 8, "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}) == (
        'zero_optimization.offload_optimizer.device="cpu" is not supported by funczero '
        "(CPU/NVMe offload is not implemented: funczero keeps everything on the accelerator); "
        'remove the key or set it to "none"'
    )
    assert "remove the 'wandb' block or set \"enabled\": false" in error_of(
        {"train_batch_size": 8, "wandb": {"enabled": True}})
    assert "'pipeline': pipeline parallelism is not supported" in error_of(
        {"train_batch_size": 8, "pipeline": {"stages": 2}})
    load({"train_batch_size": 8, "wandb": {"enabled": False, "project": "x"},
          "zero_optimization": {"zero_quantized_weights": False}})


def test_ignored_keys_warn_only_when_set_to_something_else() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load({"train_batch_size": 8, "zero_optimization": {"round_robin_gradients": False}})
    with pytest.warns(ConfigWarning, match="round_robin_gradients=true has no effect"):
        load({"train_batch_size": 8, "zero_optimization": {"round_robin_gradients": True}})


# --- resolved form -------------------------------------------------------------------------------

def test_to_dict_round_trips_and_is_json() -> None:
    cfg = load({
        "train_batch_size": 32, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "lamb", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100}},
        "fp16": {"enabled": True, "hysteresis": 3}, "zero_optimization": {"stage": 2},
        "funczero": {"seed": 7}, "gradient_clipping": 0.5,
    }, world_size=4)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Config.load(d, world_size=4) == cfg
    assert cfg.seed == 7 and cfg.funczero == FunczeroConfig(seed=7)
    assert d["optimizer"]["type"] == "Lamb" and d["optimizer"]["params"]["eps"] == 1e-8


def test_config_is_frozen_and_checks_itself() -> None:
    cfg = load({"train_batch_size": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gradient_clipping = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="!= "):
        dataclasses.replace(cfg, train_batch_size=9)
    assert cfg.raw == {"train_batch_size": 8}


# --- the key table, the dataclasses and the docs agree --------------------------------------------

def test_dataclass_defaults_come_from_the_key_table() -> None:
    for prefix, cls in (("fp16.", FP16Config), ("bf16.", BF16Config),
                        ("zero_optimization.", ZeroConfig), ("funczero.", FunczeroConfig)):
        used = {p[len(prefix):] for p, k in KEYS.items()
                if p.startswith(prefix) and "." not in p[len(prefix):]
                and k.status is Status.USED and not p.endswith(("offload_param",
                                                                "offload_optimizer"))}
        accepted = {p[len(prefix):] for p, k in KEYS.items() if p.startswith(prefix)}
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        # Every used key is a field; ignored DeepSpeed keys may stay readable as fields.
        assert used <= set(fields) <= accepted, prefix
        for name, value in fields.items():
            assert value == KEYS[prefix + name].default, prefix + name


def test_docs_list_every_key_and_are_regenerated() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for path in KEYS:
        assert f"`{path}`" in text, path
    for params in OPTIMIZER_PARAMS.values():
        for name in params:
            assert f"`optimizer.params.{name}`" in text, name
    assert render() in text, "docs/config.md is stale: run python -m funczero.config docs/config.md"


def test_docs_show_every_default() -> None:
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)`[^|]*\| ([^|]+) \|",
                                                        render(), re.M)}
    assert rows["gradient_clipping"] == "`0.0`"
    assert rows["zero_optimization.stage3_prefetch_bucket_size"] == "`5e7`"
    assert rows["fp16.initial_scale_power"] == "`16`"
