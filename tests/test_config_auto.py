"""funczero.config.auto: Hugging Face "auto" values filled from Config.load(..., auto=...)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest

from funczero.config import (
    TRAINER_FILLS,
    Config,
    ConfigError,
    ConfigWarning,
    auto_values_from_trainer_args,
)
from funczero.config.keys import KEYS, OPTIMIZER_PARAMS, SCHEDULER_PARAMS
from funczero.config.schema import Auto

# transformers' tests/deepspeed/ds_config_zero2.json and ds_config_zero3.json, the templates its
# DeepSpeed docs point to, verbatim.
HF_ZERO2: dict[str, Any] = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
    },
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
HF_ZERO3: dict[str, Any] = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
    },
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e14,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_fp16_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
# What a Trainer run of the templates would pass (TrainingArguments and the model's hidden size).
TRAINER_ARGS: dict[str, Any] = {
    "learning_rate": 3e-5, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
    "max_grad_norm": 1.0, "bf16": True, "weight_decay": 0.01, "adam_beta1": 0.9,
    "adam_beta2": 0.95, "adam_epsilon": 1e-6, "num_training_steps": 1000, "warmup_steps": 50,
    "hidden_size": 1024,
}


def without_cpu_offload(template: dict[str, Any]) -> dict[str, Any]:
    """The template with offload switched off: CPU offload is issue 11's item 2, not this one."""
    out = copy.deepcopy(template)
    for block in ("offload_optimizer", "offload_param"):
        if block in out["zero_optimization"]:
            out["zero_optimization"][block]["device"] = "none"
    return out


def load_quietly(config: dict[str, Any], **kwargs: Any) -> Config:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # zero3's deprecated key, sub_group_size
        return Config.load(config, **kwargs)


@pytest.mark.parametrize("template", [HF_ZERO2, HF_ZERO3], ids=["zero2", "zero3"])
def test_hf_templates_load_with_the_trainer_args(template: dict[str, Any]) -> None:
    auto = auto_values_from_trainer_args(**TRAINER_ARGS)
    cfg = load_quietly(without_cpu_offload(template), world_size=4, auto=auto)
    assert (cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps,
            cfg.train_batch_size) == (4, 2, 32)
    # zero3's template has no bf16 block: bf16=True fills nothing there and fp16 is false,
    # so it trains in fp32, under the HF Trainer too
    assert cfg.gradient_clipping == 1.0
    assert cfg.precision == ("bf16" if template is HF_ZERO2 else "fp32")
    assert cfg.optimizer is not None and cfg.optimizer.type == "AdamW"
    assert cfg.optimizer.params["lr"] == 3e-5 and cfg.optimizer.params["betas"] == (0.9, 0.95)
    assert cfg.optimizer.params["eps"] == 1e-6 and cfg.optimizer.params["weight_decay"] == 0.01
    assert cfg.scheduler is not None and cfg.scheduler.params == {
        "warmup_min_lr": 0.0, "warmup_max_lr": 3e-5, "warmup_num_steps": 50}
    if template is HF_ZERO3:
        assert cfg.zero.stage == 3
        assert cfg.zero.reduce_bucket_size == 1024 * 1024
        assert cfg.zero.stage3_param_persistence_threshold == 10 * 1024
        assert cfg.zero.stage3_prefetch_bucket_size == 50_000_000  # ignored: the default stays
    else:
        assert cfg.zero.stage == 2 and cfg.zero.reduce_bucket_size == 200_000_000
    assert cfg.raw == without_cpu_offload(template)  # the input as given, "auto" and all
    assert load_quietly(cfg.to_dict(), world_size=4) == cfg  # the saved form needs no auto


def test_hf_zero2_template_without_values_is_one_problem_listing_every_auto() -> None:
    with pytest.raises(ConfigError) as info:
        load_quietly(HF_ZERO2, world_size=4)
    first, *rest = info.value.problems
    assert first == (
        '7 "auto" values that only the HF Trainer fills in got no value. Pass Config.load(..., '
        "auto=funczero.config.auto_values_from_trainer_args(...)) with these arguments, or write "
        "concrete values in the config:\n"
        "  train_micro_batch_size_per_gpu: per_device_train_batch_size=\n"
        "  train_batch_size: per_device_train_batch_size= (it is then world_size * "
        "per_device_train_batch_size * accumulation)\n"
        "  gradient_clipping: max_grad_norm=\n"
        "  optimizer.params.lr: learning_rate=\n"
        "  fp16.enabled: fp16= or bf16= (giving one makes the other false)\n"
        "  bf16.enabled: bf16= or fp16= (giving one makes the other false)\n"
        "  scheduler.params.warmup_num_steps: warmup_steps=, or warmup_ratio= with "
        "num_training_steps="
    )
    # every other problem is about CPU offload (issue 11's item 2), none about "auto"
    assert all("offload" in p and '"auto"' not in p for p in rest), rest


def test_what_stays_unfilled_is_listed_and_nothing_else_about_it() -> None:
    partial = auto_values_from_trainer_args(per_device_train_batch_size=4, bf16=True)
    with pytest.raises(ConfigError) as info:
        load_quietly(without_cpu_offload(HF_ZERO3), world_size=2, auto=partial)
    assert info.value.problems == [
        ('3 "auto" values that only the HF Trainer fills in got no value. Pass Config.load(..., '
        "auto=funczero.config.auto_values_from_trainer_args(...)) with these arguments, or write "
        "concrete values in the config:\n"
        "  gradient_clipping: max_grad_norm=\n"
        "  optimizer.params.lr: learning_rate=\n"
        "  scheduler.params.warmup_num_steps: warmup_steps=, or warmup_ratio= with "
        "num_training_steps=")
    ]


def test_a_concrete_value_that_disagrees_with_auto_is_an_error_as_in_the_trainer() -> None:
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": "auto"}}}
    with pytest.raises(ConfigError) as info:
        Config.load(config, world_size=1, auto=auto_values_from_trainer_args(
            learning_rate=1e-4, max_grad_norm=0.5, per_device_train_batch_size=4,
            weight_decay=0.1))
    assert info.value.problems == [
        ("optimizer.params.lr is 0.001 in the config but auto gives 0.0001 (learning_rate); make "
        'them agree or write "auto" in the config (the HF Trainer refuses this mismatch too)')
    ]
    cfg = Config.load(config, world_size=1, auto=auto_values_from_trainer_args(
        learning_rate=1e-3, max_grad_norm=0.5, per_device_train_batch_size=4, weight_decay=0.1))
    assert cfg.optimizer is not None and cfg.optimizer.params["weight_decay"] == 0.1


def test_values_the_trainer_only_fills_are_not_checked_against_the_config() -> None:
    cfg = Config.load({"train_batch_size": 8, "zero_optimization": {"reduce_bucket_size": 100}},
                      world_size=1, auto=auto_values_from_trainer_args(hidden_size=64))
    assert cfg.zero.reduce_bucket_size == 100


def test_train_batch_size_auto_without_a_micro_batch_key_uses_the_trainers_formula() -> None:
    config = {"train_batch_size": "auto", "gradient_accumulation_steps": 3}
    auto = auto_values_from_trainer_args(per_device_train_batch_size=2)
    cfg = Config.load(config, world_size=4, auto=auto)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu,
            cfg.gradient_accumulation_steps) == (24, 2, 3)


def test_train_batch_size_auto_alone_is_filled_and_split_as_deepspeed_splits_it() -> None:
    # The Trainer writes train_batch_size = 4 * 2 * 3; DeepSpeed then derives accumulation 1.
    auto = auto_values_from_trainer_args(per_device_train_batch_size=2,
                                         gradient_accumulation_steps=3)
    cfg = Config.load({"train_batch_size": "auto"}, world_size=4, auto=auto)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu,
            cfg.gradient_accumulation_steps) == (24, 6, 1)


def test_aliases_and_the_legacy_bf16_block_are_filled() -> None:
    config = {"train_batch_size": 8, "bfloat16": {"enabled": "auto"},
              "zero_optimization": {"stage": 3, "param_persistence_threshold": "auto",
                                    "prefetch_bucket_size": "auto"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a filled key funczero ignores does not warn
        cfg = Config.load(config, world_size=1,
                          auto=auto_values_from_trainer_args(bf16=True, hidden_size=16))
    assert cfg.precision == "bf16" and cfg.zero.stage3_param_persistence_threshold == 160
    assert cfg.zero.stage3_prefetch_bucket_size == 50_000_000


def test_auto_values_nothing_asks_for_are_unused() -> None:
    cfg = Config.load({"train_batch_size": 8, "gradient_clipping": 0.3}, world_size=1,
                      auto=auto_values_from_trainer_args(**TRAINER_ARGS | {"max_grad_norm": 0.3}))
    assert cfg == Config.load({"train_batch_size": 8, "gradient_clipping": 0.3}, world_size=1)


@pytest.mark.parametrize(
    ("auto", "problem"),
    [
        ({"optimizer.lr": 1e-3},
         ("auto: \"optimizer.lr\" is not a key the HF Trainer fills; did you mean "
         "'optimizer.params.lr'?")),
        ({"steps_per_print": 10},
         'auto: "steps_per_print" is not a key the HF Trainer fills; the keys it fills: '
         + ", ".join(TRAINER_FILLS)),
        ({"optimizer.params.lr": -1.0},
         "auto['optimizer.params.lr']: expected a number >= 0, got -1.0"),
        ({"fp16.enabled": "yes"}, "auto['fp16.enabled']: expected true or false, got \"yes\""),
        ({"train_batch_size": None},
         "auto['train_batch_size']: expected an integer >= 1 and <= 2147483647, got null"),
    ],
)
def test_a_bad_auto_mapping_names_the_entry(auto: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load({"train_batch_size": 8}, world_size=1, auto=auto)
    assert info.value.problems == [problem]
    with pytest.raises(ConfigError, match=r"auto: expected a mapping \{key path: value\}"):
        Config.load({"train_batch_size": 8}, world_size=1, auto=[("fp16.enabled", True)])  # type: ignore[arg-type]


def test_helper_maps_each_argument_as_the_trainer_does() -> None:
    assert auto_values_from_trainer_args() == {"amp.enabled": False}
    assert auto_values_from_trainer_args(**TRAINER_ARGS) == {
        "optimizer.params.lr": 3e-5,
        "scheduler.params.warmup_max_lr": 3e-5,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "fp16.enabled": False,
        "bf16.enabled": True,
        "amp.enabled": False,
        "optimizer.params.weight_decay": 0.01,
        "optimizer.params.betas": [0.9, 0.95],
        "optimizer.params.eps": 1e-6,
        "scheduler.params.total_num_steps": 1000,
        "scheduler.params.warmup_num_steps": 50,
        "zero_optimization.reduce_bucket_size": 1024 * 1024,
        "zero_optimization.stage3_prefetch_bucket_size": 943_718,  # int(0.9 * 1024**2)
        "zero_optimization.stage3_param_persistence_threshold": 10_240,
    }
    assert auto_values_from_trainer_args(fp16=True)["bf16.enabled"] is False
    assert auto_values_from_trainer_args(adam_beta2=0.95)["optimizer.params.betas"] == [0.9, 0.95]
    assert auto_values_from_trainer_args(adam_beta1=0.8)["optimizer.params.betas"] == [0.8, 0.999]


@pytest.mark.parametrize(
    ("kwargs", "warmup"),
    [
        ({"warmup_steps": 7}, 7),
        ({"warmup_steps": 7, "warmup_ratio": 0.5, "num_training_steps": 100}, 7),
        ({"warmup_steps": 0, "warmup_ratio": 0.05, "num_training_steps": 101}, 6),
        ({"warmup_ratio": 0.1, "num_training_steps": 100}, 10),
        ({"warmup_steps": 0}, 0),
        ({"num_training_steps": 100}, None),
    ],
)
def test_helper_warmup_follows_get_warmup_steps(kwargs: dict[str, Any], warmup: int | None) -> None:
    assert auto_values_from_trainer_args(**kwargs).get("scheduler.params.warmup_num_steps") == (
        warmup)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": -1e-3},
         "learning_rate: expected a number >= 0 and <= 3.40282e+38, got -0.001"),
        ({"learning_rate": 1e39}, "learning_rate: expected a number >= 0 and <= 3.40282e+38"),
        ({"per_device_train_batch_size": 0},
         "per_device_train_batch_size: expected an integer >= 1"),
        ({"max_grad_norm": "1.0"}, 'max_grad_norm: expected a number >= 0, got "1.0"'),
        ({"bf16": 1}, "bf16: expected true or false, got 1"),
        ({"adam_beta2": 1.0}, "adam_beta2: expected a number >= 0 and < 1, got 1.0"),
        ({"hidden_size": 0}, "hidden_size: expected an integer >= 1, got 0"),
        ({"warmup_ratio": 0.1}, "warmup_ratio needs num_training_steps="),
        ({"warmup_ratio": 2.0, "num_training_steps": 5},
         "warmup_ratio: expected a number >= 0 and <= 1, got 2.0"),
    ],
)
def test_helper_names_a_bad_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        auto_values_from_trainer_args(**kwargs)
    assert str(info.value).startswith(message), str(info.value)


def test_hf_warmup_of_zero_steps_loads() -> None:
    cfg = Config.load(
        {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
         "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto",
                                                           "total_num_steps": "auto"}}},
        world_size=1, auto=auto_values_from_trainer_args(warmup_steps=0, num_training_steps=10))
    assert cfg.scheduler is not None
    assert cfg.scheduler.params == {"warmup_num_steps": 1, "total_num_steps": 10}


def test_every_fill_names_a_real_key_and_the_needed_ones_are_those_without_a_fallback() -> None:
    for path, fill in TRAINER_FILLS.items():
        prefix, _, name = path.rpartition(".")
        if prefix == "optimizer.params":
            assert name in OPTIMIZER_PARAMS["AdamW"], path
        elif prefix == "scheduler.params":
            assert name in SCHEDULER_PARAMS, path
        elif path != "amp.enabled":  # amp is a foreign block accepted only when disabled
            assert path in KEYS, path
            if path not in ("train_batch_size", "train_micro_batch_size_per_gpu"):
                assert bool(fill.ask) == (KEYS[path].auto is Auto.ERROR), path
