"""DeepSpeed's Comet monitor: ``comet_ml.start(...)``, each event at most every N samples.

Needs the ``comet`` extra (``comet_ml`` >= 3.41). As in DeepSpeed, an event is sent the first time
it is seen and then only once ``samples_log_interval`` more samples have passed since it was last
sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from funczero.monitors.events import Event, require
from funczero.monitors.settings import CometSettings

__all__ = ["CometMonitor"]


class CometMonitor:
    """Sends events to a Comet experiment with ``step`` = samples."""

    def __init__(self, settings: CometSettings) -> None:
        comet_ml: Any = require("comet_ml", extra="comet", block="comet")
        self.interval = settings.samples_log_interval
        self.last_sent: dict[str, int] = {}
        self.experiment = comet_ml.start(
            api_key=settings.api_key,
            project=settings.project,
            workspace=settings.workspace,
            experiment_key=settings.experiment_key,
            mode=settings.mode,
            online=settings.online,
        )
        if settings.experiment_name is not None:
            self.experiment.set_name(settings.experiment_name)

    def due(self, name: str, samples: int) -> bool:
        """Whether ``name`` is sent at ``samples`` (first time, or ``interval`` samples later)."""
        last = self.last_sent.get(name)
        if last is not None and samples - last < self.interval:
            return False
        self.last_sent[name] = samples
        return True

    def write_events(self, events: Sequence[Event]) -> None:
        for name, value, samples in events:
            if self.due(name, samples):
                self.experiment.log_metric(name, value, step=samples)

    def close(self) -> None:
        self.experiment.end()
