"""DeepSpeed-compatible training config: strict, resolved, frozen.

A DeepSpeed user's JSON works unchanged; what DeepSpeed would silently ignore or misread
(misspelled keys, non-divisible batch sizes, ``"auto"`` outside the HF Trainer) is an error that
names the key path and the fix. ``docs/config.md`` lists every key; it is generated from the
table in ``funczero/config/keys.py`` by ``python -m funczero.config``.

:class:`Config` is frozen plain data with one constructor, :meth:`Config.load`; the runtime
objects it describes are built by :mod:`funczero.from_config`.

Modules: ``load`` (``Config``), ``source`` (reading dicts, files, base64), ``jsonc`` (JSON with
comments), ``keys`` (the table of every key), ``schema`` (how a table is applied), ``checks``
(value checkers), ``sections`` (sub-block dataclasses), ``optimizer`` (optimizer and scheduler
blocks), ``batch`` (the batch-size rule), ``auto`` (filling the HF Trainer's ``"auto"``),
``trainer_args`` (its arguments as ``auto``), ``errors``, ``reference`` (the generated docs).

Example:
    >>> from funczero.config import Config
    >>> cfg = Config.load({
    ...     "train_batch_size": 32, "gradient_accumulation_steps": 2,
    ...     "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
    ...     "fp16": {"enabled": True}, "zero_optimization": {"stage": 3}}, world_size=4)
    >>> cfg.train_micro_batch_size_per_gpu, cfg.precision, cfg.zero.overlap_comm
    (4, 'fp16', True)
"""

from __future__ import annotations

from funczero.config.auto import TRAINER_FILLS as TRAINER_FILLS
from funczero.config.auto import TrainerFill as TrainerFill
from funczero.config.errors import ConfigError as ConfigError
from funczero.config.errors import ConfigWarning as ConfigWarning
from funczero.config.keys import KEYS as KEYS
from funczero.config.keys import OPTIMIZER_PARAMS as OPTIMIZER_PARAMS
from funczero.config.load import Config as Config
from funczero.config.optimizer import OptimizerConfig as OptimizerConfig
from funczero.config.optimizer import SchedulerConfig as SchedulerConfig
from funczero.config.schema import Key as Key
from funczero.config.schema import Status as Status
from funczero.config.sections import BF16Config as BF16Config
from funczero.config.sections import FP16Config as FP16Config
from funczero.config.sections import FunczeroConfig as FunczeroConfig
from funczero.config.sections import ZeroConfig as ZeroConfig
from funczero.config.trainer_args import (
    auto_values_from_trainer_args as auto_values_from_trainer_args,
)

__all__ = [
    "KEYS",
    "OPTIMIZER_PARAMS",
    "TRAINER_FILLS",
    "BF16Config",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "FP16Config",
    "FunczeroConfig",
    "Key",
    "OptimizerConfig",
    "SchedulerConfig",
    "Status",
    "TrainerFill",
    "ZeroConfig",
    "auto_values_from_trainer_args",
]
