"""The monitor blocks of a DeepSpeed config as frozen dataclasses (no torch needed).

Each dataclass mirrors one DeepSpeed block with DeepSpeed's keys and defaults (``deepspeed/
monitor/config.py`` and the FLOPs profiler's ``constants.py``), so a DeepSpeed config's
``tensorboard``, ``wandb``, ``csv_monitor``, ``comet`` and ``flops_profiler`` blocks mean the same
here. :meth:`MonitorSettings.from_deepspeed` reads them from a config dict strictly: an unknown
key or a wrong type is an error that names the key path.

Example:
    >>> s = MonitorSettings.from_deepspeed({"csv_monitor": {"enabled": True, "output_path": "logs"}})
    >>> s.csv_monitor.log_dir, s.enabled
    ('logs/DeepSpeedJobName', True)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin, get_type_hints

__all__ = [
    "CSVSettings",
    "CometSettings",
    "FlopsProfilerSettings",
    "MonitorSettings",
    "MonitorSettingsError",
    "TensorBoardSettings",
    "WandbSettings",
]

_frozen = dataclasses.dataclass(frozen=True)


class MonitorSettingsError(ValueError):
    """A monitor block of the config has an unknown key or a value of the wrong type."""


@_frozen
class TensorBoardSettings:
    """DeepSpeed's ``"tensorboard"`` block: event files under ``output_path/job_name``."""

    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"

    @property
    def log_dir(self) -> str:
        """``os.path.join(output_path, job_name)``: relative to the working directory by default."""
        return os.path.join(self.output_path, self.job_name)


@_frozen
class WandbSettings:
    """DeepSpeed's ``"wandb"`` block (``team`` is W&B's entity). ``WANDB_MODE=offline`` works."""

    enabled: bool = False
    group: str | None = None
    team: str | None = None
    project: str = "deepspeed"


@_frozen
class CSVSettings:
    """DeepSpeed's ``"csv_monitor"`` block: one ``<event>.csv`` per event under ``output_path/job_name``."""

    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"

    @property
    def log_dir(self) -> str:
        """``os.path.join(output_path, job_name)``."""
        return os.path.join(self.output_path, self.job_name)


@_frozen
class CometSettings:
    """DeepSpeed's ``"comet"`` block; each event is sent at most every ``samples_log_interval`` samples."""

    enabled: bool = False
    samples_log_interval: int = 100
    project: str | None = None
    workspace: str | None = None
    api_key: str | None = None
    experiment_name: str | None = None
    experiment_key: str | None = None
    online: bool | None = None
    mode: str | None = None


@_frozen
class FlopsProfilerSettings:
    """DeepSpeed's ``"flops_profiler"`` block.

    funczero reports FLOPs per step and MFU from a FLOPs-per-token figure (given, or counted once
    by :func:`funczero.monitors.flops.count_flops`) instead of hooking every module during a step;
    the report is printed at ``profile_step`` and written to ``output_file`` when set.
    ``recompute_fwd_factor`` adds that fraction of the forward FLOPs for activation
    recomputation, as in DeepSpeed. ``module_depth``, ``top_modules`` and ``detailed`` shape the
    per-module table of :func:`~funczero.monitors.flops.count_flops`.
    """

    enabled: bool = False
    recompute_fwd_factor: float = 0.0
    profile_step: int = 1
    module_depth: int = -1
    top_modules: int = 1
    detailed: bool = True
    output_file: str | None = None


BLOCKS: dict[str, type] = {
    "tensorboard": TensorBoardSettings,
    "wandb": WandbSettings,
    "csv_monitor": CSVSettings,
    "comet": CometSettings,
    "flops_profiler": FlopsProfilerSettings,
}
"""Config block name -> its settings class."""


@_frozen
class MonitorSettings:
    """Every monitor block of one config, plus ``wall_clock_breakdown``.

    Attributes:
        tensorboard, wandb, csv_monitor, comet, flops_profiler: the blocks (disabled by default).
        wall_clock_breakdown: time forward, backward, gradient reduction and optimizer per step.
    """

    tensorboard: TensorBoardSettings = dataclasses.field(default_factory=TensorBoardSettings)
    wandb: WandbSettings = dataclasses.field(default_factory=WandbSettings)
    csv_monitor: CSVSettings = dataclasses.field(default_factory=CSVSettings)
    comet: CometSettings = dataclasses.field(default_factory=CometSettings)
    flops_profiler: FlopsProfilerSettings = dataclasses.field(default_factory=FlopsProfilerSettings)
    wall_clock_breakdown: bool = False

    @property
    def enabled(self) -> bool:
        """Whether any event writer (tensorboard, wandb, csv_monitor, comet) is enabled."""
        return any(b.enabled for b in (self.tensorboard, self.wandb, self.csv_monitor, self.comet))

    @classmethod
    def from_deepspeed(cls, config: Mapping[str, Any]) -> MonitorSettings:
        """Read the monitor blocks of a DeepSpeed config dict; other keys are left alone.

        Raises:
            MonitorSettingsError: every unknown key and wrong type, each with its key path.

        Example:
            >>> try:
            ...     MonitorSettings.from_deepspeed({"wandb": {"enabled": True, "projekt": "x"}})
            ... except MonitorSettingsError as e:
            ...     print(e)
            unknown key 'wandb.projekt'; did you mean 'project'?
        """
        errors: list[str] = []
        blocks = {name: parse_block(name, config.get(name), errors) for name in BLOCKS}
        wcb = config.get("wall_clock_breakdown", False)
        if not isinstance(wcb, bool):
            errors.append(f"wall_clock_breakdown: expected true or false, got {wcb!r}")
        if errors:
            raise MonitorSettingsError("\n".join(errors))
        return cls(**blocks, wall_clock_breakdown=bool(wcb))


def _accepts(hint: Any, value: Any) -> bool:
    if get_origin(hint) is Union or type(hint).__name__ == "UnionType":
        return any(_accepts(h, value) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def parse_block(name: str, raw: Any, errors: list[str]) -> Any:
    """Build block ``name``'s settings from ``raw`` (``None`` means absent), appending problems."""
    cls = BLOCKS[name]
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        errors.append(f"{name}: expected an object, got {raw!r}")
        return cls()
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(hints)}"
            errors.append(f"unknown key '{name}.{key}'{hint}")
        elif value == "auto":
            continue  # DeepSpeed's pydantic blocks drop "auto": the default applies
        elif not _accepts(hints[key], value):
            errors.append(f"{name}.{key}: expected {hints[key]}, got {value!r}")
        else:
            values[key] = float(value) if hints[key] is float else value
    if name == "comet" and values.get("samples_log_interval", 1) < 1:
        errors.append(f"comet.samples_log_interval={values['samples_log_interval']} must be >= 1")
    if name == "flops_profiler" and values.get("profile_step", 1) < 1:
        errors.append(f"flops_profiler.profile_step={values['profile_step']} must be >= 1")
    return cls(**values)
