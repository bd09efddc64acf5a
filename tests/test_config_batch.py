"""funczero.config.batch: DeepSpeed's batch-size rule, with the arithmetic in every error."""

from __future__ import annotations

import time
from typing import Any

import pytest

from funczero.config import Config, ConfigError
from funczero.config.batch import resolve_batch
from funczero.config.keys import MAX_BATCH


def load(d: dict[str, Any], world_size: int = 1) -> Config:
    return Config.load(d, world_size=world_size)


def error_of(d: dict[str, Any], world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        load(d, world_size)
    return str(info.value)


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
         ['2 "auto" values that only the HF Trainer fills in got no value',
          "\n  train_micro_batch_size_per_gpu: per_device_train_batch_size=\n",
          "\n  train_batch_size: per_device_train_batch_size= (it is then world_size * "]),
        ({"train_batch_size": 0}, 1,
         [f"train_batch_size: expected null or an integer >= 1 and <= {MAX_BATCH}, got 0"]),
        ({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 3}, 1,
         ["or a train_micro_batch_size_per_gpu that divides 100, e.g. 2 or 4"]),
    ],
)
def test_batch_errors_show_the_arithmetic_and_fix(
    given: dict[str, Any], world: int, needles: list[str]
) -> None:
    message = error_of(given, world)
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("given", "world", "needle"),
    [
        ({"gradient_accumulation_steps": 1e308, "train_micro_batch_size_per_gpu": 1}, 1,
         (f"gradient_accumulation_steps: expected null or an integer >= 1 and <= {MAX_BATCH}, "
         "got 1e+308")),
        ({"train_micro_batch_size_per_gpu": 10**400}, 1,
         "got an integer of about 401 digits"),
        ({"train_micro_batch_size_per_gpu": 2**20, "gradient_accumulation_steps": 2**20}, 4,
         f"more than {MAX_BATCH} samples per step"),
        ({"train_micro_batch_size_per_gpu": 1}, 2**40, f"more than {MAX_BATCH} samples per step"),
    ],
)
def test_absurd_batch_counts_are_errors_so_the_saved_config_reloads(
    given: dict[str, Any], world: int, needle: str
) -> None:
    assert needle in error_of(given, world)


def test_the_largest_batch_round_trips() -> None:
    cfg = load({"train_micro_batch_size_per_gpu": MAX_BATCH})
    assert Config.load(cfg.to_dict(), world_size=1) == cfg


def test_suggesting_divisors_of_a_huge_batch_is_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="e.g. 1 or 2147483647"):
        resolve_batch(MAX_BATCH, 3, None, 1, "world_size=")
    assert time.perf_counter() - start < 1.0
