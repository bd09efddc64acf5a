"""funczero.config.load: ``Config`` is frozen plain data with one constructor, ``Config.load``."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

import funczero.config as config_package
from funczero.config import Config, ConfigError, FunczeroConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.json"))


def load(d: dict[str, Any], world_size: int = 1) -> Config:
    return Config.load(d, world_size=world_size)


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


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_load_and_their_saved_form_reloads(path: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the examples use no key that funczero ignores
        cfg = Config.load(path, world_size=2)
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(cfg.to_dict(), allow_nan=False))
    assert Config.load(saved, world_size=2) == cfg


def test_config_is_frozen_and_has_one_constructor() -> None:
    cfg = load({"train_batch_size": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gradient_clipping = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"Config has one constructor: Config\.load"):
        dataclasses.replace(cfg, train_batch_size=9)  # would skip every check
    with pytest.raises(TypeError, match=r"load cfg\.to_dict\(\) with your changes"):
        Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)})
    assert not hasattr(Config, "from_dict") and not hasattr(Config, "from_file")
    assert cfg.raw == {"train_batch_size": 8}


def test_changing_a_config_goes_through_load() -> None:
    cfg = load({"train_batch_size": 8})
    with pytest.raises(ConfigError, match="!= "):
        Config.load({**cfg.to_dict(), "train_batch_size": 9}, world_size=1)
    changed = Config.load({**cfg.to_dict(), "gradient_clipping": 1.0}, world_size=1)
    assert changed.gradient_clipping == 1.0 and changed != cfg


def test_copies_are_equal_configs() -> None:
    cfg = load({"train_batch_size": 8, "optimizer": {"type": "AdamW"}})
    assert copy.deepcopy(cfg) == cfg and copy.copy(cfg) == cfg
    assert "train_batch_size=8" in repr(cfg)


def test_config_is_plain_data_without_runtime_builders() -> None:
    for name in ("build_optimizer", "build_schedule", "precision_policy", "loss_scale_config"):
        assert not hasattr(Config, name), name
    assert not hasattr(config_package.OptimizerConfig, "build")
    assert not hasattr(config_package.SchedulerConfig, "build")


def test_loading_imports_no_runtime_layer_unless_a_scheduler_is_checked() -> None:
    # A scheduler block is checked by building it once with funczero.optim.schedules.
    import subprocess
    import sys

    code = (
        "import sys, funczero.config as c\n"
        "c.Config.load({'train_batch_size': 8, 'optimizer': {'type': 'AdamW'}, 'fp16': "
        "{'enabled': True}}, world_size=1)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith("
        "('funczero.optim', 'funczero.parallel', 'funczero.train'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
