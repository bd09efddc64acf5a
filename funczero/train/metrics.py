"""Reading a step's metrics on the host (the one sync point of a loop) and logging them.

:func:`read_metrics` copies one step's 0-d tensor metrics to floats and reports skipped steps.
:class:`MetricsLogger` is what a training loop calls every step: it accumulates on the device
(no sync) and once per log interval reads everything with one host sync, then on rank 0 appends
a record to ``<run_dir>/metrics.jsonl``, feeds DeepSpeed's monitors (TensorBoard, W&B, CSV,
Comet) and prints a line (or updates a progress bar). :func:`load_metrics` reads the file back.

Example:
    >>> import torch
    >>> read_metrics({"loss": torch.tensor(2.5), "skipped": torch.tensor(0)}, step=10)
    {'loss': 2.5, 'skipped': 0.0}
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from funczero.config import Config
    from funczero.monitors.settings import MonitorSettings
    from funczero.monitors.timing import PhaseTimer

__all__ = [
    "METRICS_FILE",
    "LossScaleAtMinimumError",
    "MetricsLogger",
    "load_metrics",
    "read_metrics",
]

METRICS_FILE = "metrics.jsonl"
"""The file name :class:`MetricsLogger` writes in its run directory."""


class LossScaleAtMinimumError(RuntimeError):
    """fp16 gradients overflowed with the loss scale already at ``min_loss_scale``."""


def _min_scale_message(where: str, loss_scale: object) -> str:
    return (
        f"{where}: fp16 gradients overflowed with the loss scale at its minimum "
        f"({loss_scale}); the step was skipped and the scale cannot shrink. "
        "Lower the learning rate, use bf16, or lower fp16.min_loss_scale"
    )


def read_metrics(
    metrics: Mapping[str, object], *, step: int, raise_at_min_scale: bool = False
) -> dict[str, float]:
    """Copy 0-d tensor metrics to Python floats (one sync) and report anomalies.

    Warns when the step was skipped for non-finite gradients, and loudly when an fp16 overflow
    hit the minimum loss scale (training goes on, as the scale cannot shrink further); raises
    :class:`LossScaleAtMinimumError` instead when ``raise_at_min_scale`` (config key
    ``funczero.raise_at_min_loss_scale``).
    """
    values = [v for v in metrics.values() if isinstance(v, torch.Tensor) and v.dim() == 0]
    host = torch.stack([v.detach().float().cpu() for v in values]).tolist() if values else []
    out: dict[str, float] = {}
    it = iter(host)
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            out[k] = next(it)
    if out.get("overflow_at_min_scale"):
        msg = _min_scale_message(f"step {step}", out.get("loss_scale"))
        if raise_at_min_scale:
            raise LossScaleAtMinimumError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    elif out.get("skipped"):
        warnings.warn(
            f"step {step}: gradients were not finite; the update was skipped "
            f"(loss scale {out.get('loss_scale')})",
            RuntimeWarning,
            stacklevel=2,
        )
    return out


class StepProgress(Protocol):
    """What the logger drives (``funczero.progress.TrainingProgress`` implements it)."""

    def update(self, step: int, **fields: float | None) -> None: ...

    def print(self, line: str) -> None: ...


def _jsonable(value: Any) -> Any:
    """Non-finite floats as the strings "nan", "inf", "-inf", so every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def load_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` (or its run directory) back, strings "nan"/"inf" as floats.

    When a resumed run logged a step again, the later record replaces the earlier one; records
    come back sorted by step.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no metrics file at '{p}'; give a metrics.jsonl or its run directory")
    by_step: dict[int, dict[str, Any]] = {}
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not a JSON line ({e}); is this a metrics.jsonl?") from e
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{p}:{n}: a metrics record needs a 'step' field, got {line[:80]!r}")
            by_step[int(record["step"])] = {
                k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in record.items()
            }
    return [by_step[s] for s in sorted(by_step)]


_CORE = ("loss", "lr", "grad_norm", "loss_scale")


class MetricsLogger:
    """Log a training loop's metrics: one host sync per interval, rank 0 writes.

    Call :meth:`log` after every ``train_step`` with the number of steps done and the step's
    metrics. Between log steps it only adds the skipped and overflow flags and the loss into
    device tensors (no sync), so a skipped step is reported even when it is not a log step.
    Every ``log_every`` steps it reads them with one sync and on rank 0 appends to
    ``<run_dir>/metrics.jsonl`` a record with ``step``, ``samples``, ``tokens``, ``loss`` (of
    the log step), ``loss_mean`` (over the interval), ``lr``, ``grad_norm``, ``loss_scale``,
    ``skipped`` and ``overflow_at_min_scale`` (steps in the interval), ``step_time`` (s),
    ``samples_per_second``, ``tokens_per_second``, ``flops_per_step`` and ``mfu`` (when FLOPs
    per token are known), ``peak_memory_bytes`` (CUDA: the interval's peak allocated; CPU: the
    process's peak RSS, see ``memory_kind``), ``wall_clock_ms`` (with a ``timer``) and ``time``.
    Other 0-d metrics are recorded under their own names.

    Skipped steps warn (rank 0); an overflow at the minimum fp16 loss scale warns, or raises
    :class:`LossScaleAtMinimumError` on every rank with ``raise_at_min_scale``, at the log step
    that sees it (the check needs the sync). Times are measured between syncs, so they are true
    averages; the first interval starts at the first :meth:`log` call, so the first step's
    warm-up is left out.

    Args:
        run_dir: where ``metrics.jsonl`` goes (created; appended to on resume).
        samples_per_step: samples per optimizer step over all ranks (``train_batch_size``).
        log_every: steps per record (DeepSpeed's ``steps_per_print``).
        tokens_per_sample: tokens in one sample (sequence length), for token counts.
        flops_per_token: training FLOPs per token (:mod:`funczero.monitors.flops`), for MFU.
        peak_flops: one device's peak FLOPS (default: looked up for known GPUs, none on CPU).
        world_size: devices the step runs on (MFU's divisor).
        rank: this process's rank (default: from ``torch.distributed`` or ``$RANK``).
        monitors: DeepSpeed's monitor blocks (default none) and ``flops_profiler``.
        precision: ``"fp16"`` also writes ``Train/Samples/loss_scale``, as DeepSpeed does.
        raise_at_min_scale: raise instead of warn at the minimum loss scale.
        timer: a :class:`~funczero.monitors.timing.PhaseTimer` the step marks its phases on.
        device: the step's device (default: CUDA when available), for memory and peaks.
        progress: a progress bar to update and print through (rank 0).
        echo: print a line per record on rank 0 (through ``progress`` when given).

    Example:
        >>> import tempfile, torch
        >>> run_dir = tempfile.mkdtemp()
        >>> with MetricsLogger(run_dir, samples_per_step=8, log_every=2, echo=False) as logger:
        ...     for step in range(1, 5):
        ...         metrics = {"loss": torch.tensor(1.0 / step), "lr": torch.tensor(0.1),
        ...                    "grad_norm": torch.tensor(1.0), "loss_scale": torch.tensor(1.0),
        ...                    "skipped": torch.tensor(0)}
        ...         record = logger.log(step, metrics)
        >>> [(r["step"], r["samples"], r["loss"]) for r in load_metrics(run_dir)]
        [(2, 16, 0.5), (4, 32, 0.25)]
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        samples_per_step: int,
        log_every: int = 10,
        tokens_per_sample: int | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        world_size: int = 1,
        rank: int | None = None,
        monitors: MonitorSettings | None = None,
        precision: str = "fp32",
        raise_at_min_scale: bool = False,
        timer: PhaseTimer | None = None,
        device: torch.device | str | None = None,
        progress: StepProgress | None = None,
        echo: bool = True,
    ) -> None:
        from funczero.monitors.flops import peak_flops as lookup_peak
        from funczero.monitors.hub import MonitorHub, current_rank
        from funczero.monitors.settings import MonitorSettings

        for name, value in (("samples_per_step", samples_per_step), ("log_every", log_every),
                            ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MetricsLogger: {name}={value!r} must be an integer >= 1")
        if tokens_per_sample is not None and tokens_per_sample < 1:
            raise ValueError(f"MetricsLogger: tokens_per_sample={tokens_per_sample} must be >= 1")
        self.settings = monitors or MonitorSettings()
        profiler = self.settings.flops_profiler
        if profiler.enabled and (flops_per_token is None or tokens_per_sample is None):
            raise ValueError(
                "flops_profiler.enabled: funczero does not hook modules during a step; it reports "
                "FLOPs per step and MFU from a FLOPs-per-token figure. Pass flops_per_token= "
                "(funczero.monitors.flops.count_flops_per_token or transformer_flops_per_token) "
                'and tokens_per_sample= to the logger, or set "flops_profiler": {"enabled": false}'
            )
        self.rank = current_rank() if rank is None else rank
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.samples_per_step = samples_per_step
        self.log_every = log_every
        self.tokens_per_sample = tokens_per_sample
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.precision = precision
        self.raise_at_min_scale = raise_at_min_scale
        self.timer = timer
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.peak_flops = peak_flops if peak_flops is not None else lookup_peak(
            self.device, "fp32" if precision == "fp32" else "bf16"
        )
        self.progress = progress if self.rank == 0 else None
        self.echo = echo and self.rank == 0
        self.hub = MonitorHub(self.settings, rank=self.rank)
        self.file: Any = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
        self.acc: dict[str, torch.Tensor] | None = None
        self.steps_in_interval = 0
        self.last_step: int | None = None
        self.last_time = 0.0
        self.profiled = False
        self.records = 0

    @classmethod
    def from_config(
        cls, config: Config, run_dir: str | os.PathLike[str], **kwargs: Any
    ) -> MetricsLogger:
        """A logger set up from a resolved config: batch size, ``steps_per_print``, precision,
        ``funczero.raise_at_min_loss_scale``, the monitor blocks and ``wall_clock_breakdown``
        (a :class:`~funczero.monitors.timing.PhaseTimer` as ``logger.timer``). Keyword
        arguments override (``tokens_per_sample``, ``flops_per_token``, ``progress`` ...).
        """
        from funczero.monitors.settings import MonitorSettings
        from funczero.monitors.timing import PhaseTimer

        monitors = getattr(config, "monitors", None) or MonitorSettings.from_deepspeed(config.raw)
        options: dict[str, Any] = {
            "samples_per_step": config.train_batch_size,
            "log_every": config.steps_per_print or 10,
            "world_size": config.world_size,
            "monitors": monitors,
            "precision": config.precision,
            "raise_at_min_scale": config.funczero.raise_at_min_loss_scale,
        }
        options.update(kwargs)
        if config.wall_clock_breakdown and options.get("timer") is None:
            options["timer"] = PhaseTimer(options.get("device") or (
                "cuda" if torch.cuda.is_available() else "cpu"))
        return cls(run_dir, **options)

    # --- per step -------------------------------------------------------------------------

    def _accumulate(self, metrics: Mapping[str, Any]) -> None:
        loss = metrics["loss"].detach().float()
        if self.acc is None:
            zeros = torch.zeros(3, dtype=torch.float32, device=loss.device)
            self.acc = {"sums": zeros}
        flags = [loss, metrics.get("skipped", loss.new_zeros(())),
                 metrics.get("overflow_at_min_scale", loss.new_zeros(()))]
        self.acc["sums"].add_(torch.stack([f.detach().float() for f in flags]))

    def log(self, step: int, metrics: Mapping[str, Any], *, force: bool = False
            ) -> dict[str, Any] | None:
        """Record one finished step; every ``log_every`` steps (or with ``force``) write a record.

        Args:
            step: optimizer steps done, counting this one (``int(state.step)`` after the step).
            metrics: the step's metrics (0-d tensors from ``train_step``).
            force: write a record now (e.g. at the last step).

        Returns:
            The record on log steps (every rank; only rank 0 writes it), else ``None``.
        """
        if "loss" not in metrics:
            raise KeyError(f"MetricsLogger.log: metrics have no 'loss' (got {sorted(metrics)})")
        if self.last_step is None:  # the first call starts the clock; its step is warm-up
            self.last_step, self.last_time = step, time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.steps_in_interval += 1
        self._accumulate(metrics)
        if self.progress is not None:
            self.progress.update(step)
        if not (force or step % self.log_every == 0):
            return None
        return self._flush(step, metrics)

    # --- per interval ---------------------------------------------------------------------

    def _read(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """One sync: the step's 0-d metrics and the interval's sums."""
        assert self.acc is not None
        names = [k for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
        dev = self.acc["sums"].device
        parts = [metrics[k].detach().float().to(dev).reshape(1) for k in names]
        host = torch.cat([*parts, self.acc["sums"]]).tolist()
        self.acc["sums"].zero_()
        out = dict(zip(names, host[: len(names)]))
        out["_loss_sum"], out["_skipped"], out["_overflow"] = host[len(names):]
        return out

    def _flush(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        values = self._read(metrics)
        now = time.perf_counter()
        count = self.steps_in_interval
        elapsed = now - self.last_time
        calls = count + (1 if self.records == 0 else 0)  # the first interval also holds its first call
        record: dict[str, Any] = {"step": step, "samples": step * self.samples_per_step}
        if self.tokens_per_sample:
            record["tokens"] = record["samples"] * self.tokens_per_sample
        for k in _CORE:
            if k in values:
                record[k] = values[k]
        record["loss_mean"] = values["_loss_sum"] / max(calls, 1)
        record["skipped"] = int(values["_skipped"])
        record["overflow_at_min_scale"] = int(values["_overflow"])
        for k, v in values.items():
            if not k.startswith("_") and k not in record and k not in ("skipped", "overflow_at_min_scale"):
                record[k] = v
        self._throughput(record, count, elapsed)
        self._memory(record)
        if self.timer is not None:
            record["wall_clock_ms"] = self.timer.collect()
        record["time"] = time.time()
        first = (self.last_step + 1) if self.records else self.last_step
        self.steps_in_interval, self.last_time, self.last_step = 0, now, step
        self.records += 1
        self._report(record, first)
        if self.rank == 0:
            self._write(record)
        return record

    def _throughput(self, record: dict[str, Any], count: int, elapsed: float) -> None:
        ok = count > 0 and elapsed > 0
        record["step_time"] = elapsed / count if ok else None
        record["samples_per_second"] = count * self.samples_per_step / elapsed if ok else None
        tps = None
        if ok and self.tokens_per_sample:
            tps = count * self.samples_per_step * self.tokens_per_sample / elapsed
        record["tokens_per_second"] = tps
        if self.flops_per_token is not None and self.tokens_per_sample:
            record["flops_per_step"] = (
                self.flops_per_token * self.samples_per_step * self.tokens_per_sample
            )
        if tps is not None and self.flops_per_token is not None and self.peak_flops:
            record["mfu"] = self.flops_per_token * tps / (self.peak_flops * self.world_size)

    def _memory(self, record: dict[str, Any]) -> None:
        if self.device.type == "cuda":
            record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            record["memory_kind"] = "cuda_max_allocated"
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            record["peak_memory_bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)
            record["memory_kind"] = "host_max_rss"

    def _report(self, record: dict[str, Any], first: int | None) -> None:
        step = record["step"]
        where = f"step {step}" if first is None or first >= step else f"steps {first}-{step}"
        if record["overflow_at_min_scale"]:
            msg = _min_scale_message(where, record.get("loss_scale"))
            if self.raise_at_min_scale:
                raise LossScaleAtMinimumError(msg)
            if self.rank == 0:
                warnings.warn(msg, RuntimeWarning, stacklevel=4)
        elif record["skipped"] and self.rank == 0:
            warnings.warn(
                f"{where}: {record['skipped']} step(s) had non-finite gradients; their updates "
                f"were skipped (loss scale {record.get('loss_scale')})",
                RuntimeWarning,
                stacklevel=4,
            )

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(_jsonable(record)) + "\n")
        self.file.flush()
        loss_scale = self.precision == "fp16"
        if self.hub.enabled:
            from funczero.monitors.hub import deepspeed_events

            self.hub.write_events(deepspeed_events(record, loss_scale=loss_scale))
        line = format_record(record)
        if self.progress is not None:
            self.progress.update(
                record["step"], loss=record.get("loss"),
                tokens_per_second=record.get("tokens_per_second"),
            )
            if self.echo:
                self.progress.print(line)
        elif self.echo:
            print(line, flush=True)
        self._profile_report(record)

    def _profile_report(self, record: dict[str, Any]) -> None:
        profiler = self.settings.flops_profiler
        if not profiler.enabled or self.profiled or record["step"] < profiler.profile_step:
            return
        self.profiled = True
        flops = record.get("flops_per_step")
        lines = [
            f"flops profiler (step {record['step']}, measured over the steps since the last record):",
            f"  FLOPs per token: {self.flops_per_token:.4g}",
            f"  FLOPs per step (all ranks): {flops:.4g}",
        ]
        if record.get("step_time"):
            achieved = flops / record["step_time"] / self.world_size
            lines.append(f"  achieved per device: {achieved / 1e12:.3f} TFLOPS")
        if record.get("mfu") is not None:
            lines.append(f"  MFU: {record['mfu']:.2%} of {self.peak_flops / 1e12:.1f} TFLOPS")
        elif not self.peak_flops:
            lines.append("  MFU: unknown peak FLOPS for this device (pass peak_flops=)")
        text = "\n".join(lines)
        if profiler.output_file:
            Path(profiler.output_file).write_text(text + "\n", encoding="utf-8")
        if self.echo:
            (self.progress.print if self.progress is not None else print)(text)

    def close(self) -> None:
        """Close the metrics file and the monitors (idempotent)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        self.hub.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_record(record: Mapping[str, Any]) -> str:
    """The console line of a record: ``step 100 | loss 2.3456 | lr 1.00e-03 | ...``.

    Example:
        >>> format_record({"step": 5, "loss": 2.0, "lr": 0.001, "skipped": 0})
        'step     5 | loss 2.0000 | lr 1.00e-03 | skipped 0'
    """
    parts = [f"step {record['step']:5d}"]
    fmt: list[tuple[str, str, Callable[[Any], str]]] = [
        ("loss", "loss", lambda v: f"{v:.4f}"),
        ("lr", "lr", lambda v: f"{v:.2e}"),
        ("grad_norm", "grad norm", lambda v: f"{v:.3f}"),
        ("loss_scale", "scale", lambda v: f"{v:g}"),
        ("skipped", "skipped", lambda v: f"{v}"),
    ]
    for key, label, show in fmt:
        if record.get(key) is not None:
            parts.append(f"{label} {show(record[key])}")
    if record.get("tokens_per_second") is not None:
        parts.append(f"{record['tokens_per_second']:,.0f} tokens/s")
    elif record.get("samples_per_second") is not None:
        parts.append(f"{record['samples_per_second']:,.1f} samples/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {record['mfu']:.1%}")
    if record.get("peak_memory_bytes") and record.get("memory_kind") == "cuda_max_allocated":
        parts.append(f"{record['peak_memory_bytes'] / 2**30:.2f} GiB peak")
    for phase, ms in (record.get("wall_clock_ms") or {}).items():
        parts.append(f"{phase} {ms:.1f} ms")
    return " | ".join(parts)
