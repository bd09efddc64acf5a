"""DeepSpeed's TensorBoard monitor: scalars in event files under ``output_path/job_name``.

Needs the ``tensorboard`` extra (``torch.utils.tensorboard.SummaryWriter``). Read the files with
``tensorboard --logdir <output_path>`` or ``EventAccumulator``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from funczero.monitors.events import Event, require
from funczero.monitors.settings import TensorBoardSettings

__all__ = ["TensorBoardMonitor"]


class TensorBoardMonitor:
    """Writes each event as a scalar with ``global_step`` = samples, flushing after each batch."""

    def __init__(self, settings: TensorBoardSettings) -> None:
        require("tensorboard", extra="tensorboard", block="tensorboard")
        writer_module: Any = require(
            "torch.utils.tensorboard", extra="tensorboard", block="tensorboard"
        )
        self.log_dir = settings.log_dir
        os.makedirs(self.log_dir or ".", exist_ok=True)
        self.writer = writer_module.SummaryWriter(log_dir=self.log_dir or ".")

    def write_events(self, events: Sequence[Event]) -> None:
        for name, value, samples in events:
            self.writer.add_scalar(name, value, samples)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
