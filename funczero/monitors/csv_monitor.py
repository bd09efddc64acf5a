"""DeepSpeed's CSV monitor: one ``<event name>.csv`` file per event, needing no library.

Files go to ``output_path/job_name``; ``Train/Samples/train_loss`` becomes
``Train_Samples_train_loss.csv`` with the header ``step,train_loss`` (the "step" column holds
samples, as in DeepSpeed). Rows are appended, so a resumed run continues the same files; the
header is written only when a file is new.

Example:
    >>> import tempfile, os
    >>> from funczero.monitors.settings import CSVSettings
    >>> out = tempfile.mkdtemp()
    >>> m = CSVMonitor(CSVSettings(enabled=True, output_path=out, job_name="run"))
    >>> m.write_events([("Train/Samples/train_loss", 2.5, 64)])
    >>> m.close()
    >>> open(os.path.join(out, "run", "Train_Samples_train_loss.csv")).read().split()
    ['step,train_loss', '64,2.5']
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from funczero.monitors.events import Event
from funczero.monitors.settings import CSVSettings

__all__ = ["CSVMonitor", "csv_file_name"]


def csv_file_name(event_name: str) -> str:
    """The file DeepSpeed writes an event to: ``/`` and spaces become ``_``, plus ``.csv``."""
    return event_name.replace("/", "_").replace(" ", "_") + ".csv"


class CSVMonitor:
    """Appends events to per-event CSV files under ``settings.log_dir``."""

    def __init__(self, settings: CSVSettings) -> None:
        self.log_dir = settings.log_dir
        os.makedirs(self.log_dir or ".", exist_ok=True)

    def write_events(self, events: Sequence[Event]) -> None:
        for name, value, samples in events:
            path = os.path.join(self.log_dir, csv_file_name(name))
            new = not os.path.exists(path) or os.path.getsize(path) == 0
            with open(path, "a", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", name.rsplit("/", 1)[-1]])
                writer.writerow([samples, value])

    def close(self) -> None:
        """Nothing to release: every write opens and closes its file."""
