"""DeepSpeed's Weights & Biases monitor: ``wandb.init(project, group, entity=team)``.

Needs the ``wandb`` extra. ``WANDB_MODE=offline`` (or ``disabled``) and the other ``WANDB_*``
variables work as usual; offline runs are written under ``WANDB_DIR`` (default ``./wandb``) and
can be uploaded later with ``wandb sync``. Events of one call share one ``wandb.log`` at
``step`` = samples, committed at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from funczero.monitors.events import Event, require
from funczero.monitors.settings import WandbSettings

__all__ = ["WandbMonitor"]


class WandbMonitor:
    """Logs events to the active W&B run, starting one when none is active."""

    def __init__(self, settings: WandbSettings) -> None:
        self.wandb: Any = require("wandb", extra="wandb", block="wandb")
        self.owns_run = self.wandb.run is None
        self.run = self.wandb.run or self.wandb.init(
            project=settings.project, group=settings.group, entity=settings.team
        )

    def write_events(self, events: Sequence[Event]) -> None:
        by_samples: dict[int, dict[str, float]] = {}
        for name, value, samples in events:
            by_samples.setdefault(samples, {})[name] = value
        for samples, data in sorted(by_samples.items()):
            self.run.log(data, step=samples, commit=True)  # durable now, not at the next step

    def close(self) -> None:
        if self.owns_run:
            self.run.finish()
