"""funczero.config.source: every source is read within bounds; every failure is a ConfigError."""

from __future__ import annotations

import base64
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from funczero.config import Config, ConfigError, ConfigWarning
from funczero.config.source import MAX_BYTES, MAX_VALUES

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
  "dump_state": false
}
"""


def error_of(source: Any, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        Config.load(source, world_size=world_size)
    return str(info.value)


def test_deepspeed_zero3_file_with_comments_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(ZERO3_FILE)
    ignored = "stage3_gather_16bit_weights_on_model_save=true has no effect in funczero"
    with pytest.warns(ConfigWarning, match=ignored):
        cfg = Config.load(path, world_size=4)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu,
            cfg.gradient_accumulation_steps) == (64, 2, 8)
    assert cfg.precision == "bf16" and cfg.zero.stage == 3 and cfg.zero.overlap_comm
    assert cfg.zero.stage3_prefetch_bucket_size == 50_000_000
    assert cfg.zero.stage3_gather_16bit_weights_on_model_save is True
    assert cfg.optimizer is not None and cfg.optimizer.params["betas"] == (0.9, 0.95)
    assert cfg.scheduler is not None and cfg.scheduler.type == "WarmupDecayLR"
    assert cfg.gradient_clipping == 1.0 and cfg.steps_per_print == 100
    with pytest.warns(ConfigWarning, match=ignored):
        assert Config.load(str(path), world_size=4) == cfg
    with pytest.warns(ConfigWarning, match=ignored):
        assert Config.load(json.loads(json.dumps(cfg.raw)), world_size=4) == cfg


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"train_batch_size": 8}')
    assert Config.load(path, world_size=1).train_batch_size == 8


def test_base64_source_as_deepspeed_accepts() -> None:
    encoded = base64.urlsafe_b64encode(json.dumps({"train_batch_size": 16}).encode()).decode()
    assert Config.load(encoded, world_size=2).train_micro_batch_size_per_gpu == 8


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    assert "does not exist" in error_of(tmp_path / "nope.json")
    assert "neither an existing file" in error_of("nope")


def test_non_utf8_bytes_name_the_byte_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{\n  "train_batch_size": 8,\n  "x": "caf\xe9"\n}')
    message = error_of(path)
    assert "is not UTF-8 text: byte 0xe9 at line 3" in message
    assert "save the file as UTF-8" in message


def test_files_that_are_not_configs_are_rejected_without_reading_them(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(10 * MAX_BYTES)  # sparse: costs no disk
    start = time.perf_counter()
    assert f"has {10 * MAX_BYTES} bytes; a config is at most {MAX_BYTES} bytes" in error_of(big)
    assert "is not a regular file" in error_of(tmp_path)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert "is not a regular file" in error_of(fifo)  # and does not wait for a writer
    assert "is not a regular file" in error_of("/dev/zero")
    assert time.perf_counter() - start < 1.0


def test_odd_paths_and_strings_are_config_errors() -> None:
    assert "neither an existing file" in error_of("x" * 100_000)  # too long for the file system
    assert "does not exist" in error_of("a\0b.json")
    assert "expected a dict, a file path or base64 JSON, got bytes" in error_of(b"{}")
    assert "the top level must be a JSON object, got [1]" in error_of(
        base64.urlsafe_b64encode(b"[1]").decode())


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {
            "warmup_max_lr": math.inf}}},
         "scheduler.params.warmup_max_lr: Infinity is not a finite number; give a finite value"),
        ({"train_batch_size": 8, "gradient_clipping": math.nan},
         "gradient_clipping: NaN is not a finite number"),
        ({"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {
            "betas": [0.9, -math.inf]}}},
         "optimizer.params.betas[1]: -Infinity is not a finite number"),
        ({"train_batch_size": 8, "tensorboard": {"enabled": False, "x": math.nan}},
         "tensorboard.x: NaN is not a finite number"),
        ({"train_batch_size": 8, 3: 1}, "the top level: key 3 is a int, not a string"),
        ({"train_batch_size": 8, "fp16": {"enabled": {1, 2}}},
         "fp16.enabled: a set is not a JSON value"),
    ],
)
def test_values_that_are_not_finite_json_are_errors_naming_the_key(
    config: dict[Any, Any], needle: str
) -> None:
    assert needle in error_of(config)


def test_non_finite_numbers_in_files_are_errors_too(tmp_path: Path) -> None:
    path = tmp_path / "inf.json"
    path.write_text('{"train_batch_size": 8, "gradient_clipping": 1e999, "fp16": '
                    '{"loss_scale": -Infinity, "min_loss_scale": NaN}}')
    with pytest.raises(ConfigError) as info:
        Config.load(path, world_size=1)
    assert info.value.problems == [
        "gradient_clipping: Infinity is not a finite number; give a finite value",
        "fp16.loss_scale: -Infinity is not a finite number; give a finite value",
        "fp16.min_loss_scale: NaN is not a finite number; give a finite value",
    ]


def test_deep_self_referencing_and_huge_dicts_are_errors() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(10_000):
        node["a"] = node = {}
    assert "nest deeper than 32 levels" in error_of({"train_batch_size": 8, "x": deep})
    loop: dict[str, Any] = {"train_batch_size": 8}
    loop["self"] = loop
    assert "a dict that contains itself never ends" in error_of(loop)
    huge = {str(i): i for i in range(20 * MAX_VALUES)}
    start = time.perf_counter()
    assert f"more than {MAX_VALUES} values" in error_of(huge)
    assert time.perf_counter() - start < 1.0


def test_the_input_is_copied_as_plain_json() -> None:
    given = {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"betas": (0.9, 0.9)}}}
    cfg = Config.load(given, world_size=1)
    given["optimizer"]["params"]["betas"] = (0.1, 0.1)
    assert cfg.raw["optimizer"]["params"]["betas"] == [0.9, 0.9]
    assert cfg.optimizer is not None and cfg.optimizer.params["betas"] == (0.9, 0.9)


def test_world_size_defaults_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Config.load({"train_batch_size": 32}).train_micro_batch_size_per_gpu == 8
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=4 in the environment"):
        Config.load({"train_batch_size": 30})
    monkeypatch.delenv("WORLD_SIZE")
    assert Config.load({"train_batch_size": 30}).world_size == 1
    for bad in ("two", "0", "-1", "²", "9" * 5000):
        monkeypatch.setenv("WORLD_SIZE", bad)
        with pytest.raises(ConfigError, match="WORLD_SIZE=.* in the environment is not an"):
            Config.load({"train_batch_size": 30})
    for bad_arg in (0, True, 2.0, "2"):
        with pytest.raises(ConfigError, match="world_size: expected an integer >= 1"):
            Config.load({"train_batch_size": 30}, world_size=bad_arg)  # type: ignore[arg-type]
