"""DeepSpeed's monitors for funczero: TensorBoard, W&B, CSV and Comet, FLOPs and step timing.

A DeepSpeed config's ``tensorboard``, ``wandb``, ``csv_monitor`` and ``comet`` blocks become a
:class:`MonitorHub` writing DeepSpeed's events (``Train/Samples/train_loss``, ``.../lr``,
``.../loss_scale``; x-axis = samples) to DeepSpeed's paths. Most users never touch this package:
:class:`funczero.train.metrics.MetricsLogger` builds the hub from the config. See
``docs/monitoring.md``.

Modules: :mod:`~funczero.monitors.settings` (the blocks), :mod:`~funczero.monitors.hub`,
:mod:`~funczero.monitors.csv_monitor`, :mod:`~funczero.monitors.tensorboard_monitor`,
:mod:`~funczero.monitors.wandb_monitor`, :mod:`~funczero.monitors.comet_monitor`,
:mod:`~funczero.monitors.flops` (FLOPs per token, MFU), :mod:`~funczero.monitors.timing`
(``wall_clock_breakdown``). Importing the package does not import torch or any monitor library.
"""

from __future__ import annotations

from funczero.monitors.events import Event as Event
from funczero.monitors.events import MissingExtraError as MissingExtraError
from funczero.monitors.hub import MonitorHub as MonitorHub
from funczero.monitors.hub import deepspeed_events as deepspeed_events
from funczero.monitors.settings import MonitorSettings as MonitorSettings
from funczero.monitors.settings import MonitorSettingsError as MonitorSettingsError

__all__ = [
    "Event",
    "MissingExtraError",
    "MonitorHub",
    "MonitorSettings",
    "MonitorSettingsError",
    "deepspeed_events",
]
