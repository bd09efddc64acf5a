"""funczero.config.sections: the fp16, bf16, ZeRO and funczero blocks and their legacy forms."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from funczero.config import (
    KEYS,
    BF16Config,
    Config,
    ConfigError,
    ConfigWarning,
    FP16Config,
    FunczeroConfig,
    Status,
    ZeroConfig,
)


def load(d: dict[str, Any], world_size: int = 1) -> Config:
    return Config.load(d, world_size=world_size)


def error_of(d: dict[str, Any], world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        load(d, world_size)
    return str(info.value)


def test_fp16_defaults() -> None:
    cfg = load({"train_batch_size": 8, "fp16": {"enabled": True}})
    assert cfg.fp16 == FP16Config(enabled=True)
    assert (cfg.fp16.loss_scale, cfg.fp16.initial_scale_power, cfg.fp16.loss_scale_window,
            cfg.fp16.hysteresis, cfg.fp16.min_loss_scale) == (0.0, 16, 1000, 2, 1.0)
    assert cfg.fp16.dynamic_loss_scale and cfg.precision == "fp16"


@pytest.mark.parametrize("bf16_name", ["bf16", "bfloat16"])
def test_fp16_and_bf16_together_is_one_error(bf16_name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"train_batch_size": 8, "fp16": {"enabled": True}, bf16_name: {"enabled": True}})
    assert info.value.problems == [
        f"fp16.enabled and {bf16_name}.enabled are both true; enable one of them "
        "(DeepSpeed refuses this too)"
    ]


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


def test_overlap_comm_follows_deepspeed_code_default() -> None:
    assert load({"train_batch_size": 8, "zero_optimization": {"stage": 3}}).zero.overlap_comm
    assert not load({"train_batch_size": 8, "zero_optimization": {"stage": 2}}).zero.overlap_comm
    assert ZeroConfig(stage=3).overlap_comm is True


@pytest.mark.filterwarnings("ignore:zero_optimization.*has no effect:funczero.config.ConfigWarning")
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
        "stage": 2, "offload_optimizer": {"device": "nvme"}}}) == (
        'zero_optimization.offload_optimizer.device: NVMe offload is not implemented (funczero '
        'offloads to host memory only): use "device": "cpu", got "nvme"'
    )
    assert "remove the 'elasticity' block or set \"enabled\": false" in error_of(
        {"train_batch_size": 8, "elasticity": {"enabled": True}})
    assert "'pipeline': pipeline parallelism is not supported" in error_of(
        {"train_batch_size": 8, "pipeline": {"stages": 2}})
    load({"train_batch_size": 8, "elasticity": {"enabled": False, "max_train_batch_size": 9},
          "zero_optimization": {"zero_quantized_weights": False}})


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
