"""``MonitorHub``: DeepSpeed's ``MonitorMaster``, fanning events out to the enabled monitors.

Only rank 0 opens writers and writes; every rank checks that the enabled monitors' libraries are
importable, so a missing extra stops all ranks with the same :class:`MissingExtraError` instead
of crashing rank 0 and leaving the others waiting in a collective.

Example:
    >>> import tempfile, os
    >>> from funczero.monitors.settings import MonitorSettings
    >>> out = tempfile.mkdtemp()
    >>> hub = MonitorHub(MonitorSettings.from_deepspeed(
    ...     {"csv_monitor": {"enabled": True, "output_path": out, "job_name": "job"}}), rank=0)
    >>> hub.write_events([("Train/Samples/lr", 0.001, 32)])
    >>> hub.close()
    >>> sorted(os.listdir(os.path.join(out, "job")))
    ['Train_Samples_lr.csv']
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

from funczero.monitors.events import Event, EventWriter, MissingExtraError
from funczero.monitors.settings import MonitorSettings

__all__ = ["EXTRAS", "MonitorHub", "current_rank", "deepspeed_events"]

EXTRAS: dict[str, tuple[str, str]] = {
    # block -> (module that must be importable, the funczero extra that installs it)
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "comet": ("comet_ml", "comet"),
}

TIMER_EVENTS: dict[str, str] = {
    # wall-clock phase (funczero.monitors.timing) -> DeepSpeed's event name
    "forward": "Train/Samples/elapsed_time_ms_forward",
    "backward": "Train/Samples/elapsed_time_ms_backward",
    "backward_inner": "Train/Samples/elapsed_time_ms_backward_inner",
    "reduce": "Train/Samples/elapsed_time_ms_backward_allreduce",
    "optimizer": "Train/Samples/elapsed_time_ms_step",
}

EXTRA_EVENTS: dict[str, str] = {
    # metrics.jsonl field -> event name (funczero's additions; DeepSpeed does not write these)
    "grad_norm": "Train/Samples/grad_norm",
    "skipped": "Train/Samples/skipped_steps",
    "tokens_per_second": "Train/Samples/tokens_per_second",
    "mfu": "Train/Samples/mfu",
    "peak_memory_bytes": "Train/Samples/peak_memory_bytes",
}


def current_rank() -> int:
    """This process's global rank: ``torch.distributed`` when initialised, else ``$RANK``, else 0."""
    import sys

    dist = sys.modules.get("torch.distributed")  # never import torch just to learn the rank
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0"))


def _check_extras(settings: MonitorSettings) -> None:
    for block, (module, extra) in EXTRAS.items():
        if getattr(settings, block).enabled and importlib.util.find_spec(module) is None:
            raise MissingExtraError(
                f'the "{block}" block is enabled but its library is not installed (no module '
                f"named '{module}'); pip install 'funczero[{extra}]', or set "
                f'"{block}": {{"enabled": false}}'
            )


def deepspeed_events(record: Mapping[str, Any], *, loss_scale: bool) -> list[Event]:
    """The events DeepSpeed writes for one logged step, plus funczero's extra ones.

    DeepSpeed's: ``Train/Samples/train_loss``, ``Train/Samples/lr``, ``Train/Samples/loss_scale``
    (only when ``loss_scale``, i.e. fp16, as in DeepSpeed) and, when the record holds wall-clock
    times, ``Train/Samples/elapsed_time_ms_{forward,backward,backward_inner,backward_allreduce,
    step}``. funczero adds grad norm, skipped steps, tokens/s, MFU and peak memory when known.
    The x-axis is ``record["samples"]``.

    Example:
        >>> deepspeed_events({"samples": 64, "loss": 2.0, "lr": 0.1, "loss_scale": 1024.0},
        ...                  loss_scale=True)
        [('Train/Samples/train_loss', 2.0, 64), ('Train/Samples/lr', 0.1, 64), ('Train/Samples/loss_scale', 1024.0, 64)]
    """
    samples = int(record["samples"])
    names = {"loss": "Train/Samples/train_loss", "lr": "Train/Samples/lr"}
    if loss_scale:
        names["loss_scale"] = "Train/Samples/loss_scale"
    names.update(EXTRA_EVENTS)
    events = [(name, float(record[k]), samples) for k, name in names.items()
              if isinstance(record.get(k), (int, float))]
    times = record.get("wall_clock_ms") or {}
    events += [(TIMER_EVENTS[p], float(ms), samples) for p, ms in times.items() if p in TIMER_EVENTS]
    return events


class MonitorHub:
    """The enabled monitors of a config, on rank 0; a no-op elsewhere or when none is enabled.

    Args:
        settings: the monitor blocks (``MonitorSettings.from_deepspeed(config_dict)``).
        rank: this process's global rank (default :func:`current_rank`).

    Raises:
        MissingExtraError: an enabled block's library is not installed (on every rank).
    """

    def __init__(self, settings: MonitorSettings, *, rank: int | None = None) -> None:
        _check_extras(settings)
        self.settings = settings
        self.rank = current_rank() if rank is None else rank
        self.writers: list[EventWriter] = []
        if self.rank != 0:
            return
        if settings.tensorboard.enabled:
            from funczero.monitors.tensorboard_monitor import TensorBoardMonitor

            self.writers.append(TensorBoardMonitor(settings.tensorboard))
        if settings.wandb.enabled:
            from funczero.monitors.wandb_monitor import WandbMonitor

            self.writers.append(WandbMonitor(settings.wandb))
        if settings.csv_monitor.enabled:
            from funczero.monitors.csv_monitor import CSVMonitor

            self.writers.append(CSVMonitor(settings.csv_monitor))
        if settings.comet.enabled:
            from funczero.monitors.comet_monitor import CometMonitor

            self.writers.append(CometMonitor(settings.comet))

    @property
    def enabled(self) -> bool:
        """Whether any writer is open (rank 0 with at least one enabled block)."""
        return bool(self.writers)

    def write_events(self, events: Sequence[Event]) -> None:
        """Send ``events`` to every open writer."""
        for writer in self.writers:
            writer.write_events(events)

    def close(self) -> None:
        """Close every writer (idempotent)."""
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.close()

    def __enter__(self) -> MonitorHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
