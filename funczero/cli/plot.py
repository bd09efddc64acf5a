"""``funczero plot``: draw one or more ``metrics.jsonl`` files into one PNG.

Six panels: loss (the logged step's, and the interval mean dashed), learning rate, gradient norm,
loss scale (log scale) with skipped steps marked, throughput (tokens/s, else samples/s) and
peak memory. Several runs are overlaid, one colour each. Needs the ``plot`` extra (matplotlib).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["plot", "plot_runs"]

_PANELS = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("loss_scale", "loss scale (x: skipped steps)"),
    ("throughput", "throughput"),
    ("memory", "peak memory (GiB)"),
)


def _label(path: Path) -> str:
    return path.parent.name if path.name == "metrics.jsonl" and path.parent.name else path.stem


def _series(records: Sequence[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and isinstance(r.get(x), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(
    paths: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    x: str = "step",
    title: str | None = None,
) -> Path:
    """Draw the runs of ``paths`` (metrics.jsonl files or run directories) into ``output``.

    Args:
        paths: one or more metrics files; each is one run.
        output: the image to write (format from the suffix: .png, .svg, .pdf).
        labels: one legend label per run (default: the run directory's name).
        x: ``"step"``, ``"samples"`` or ``"tokens"``.
        title: the figure title.

    Returns:
        The written path.
    """
    from funczero.monitors.events import require
    from funczero.train.metrics import load_metrics

    if x not in ("step", "samples", "tokens"):
        raise ValueError(f"x={x!r} must be 'step', 'samples' or 'tokens'")
    if not paths:
        raise ValueError("plot_runs: give at least one metrics.jsonl")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs; give one label per run")
    matplotlib: Any = require("matplotlib", extra="plot", purpose="funczero plot")
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    runs = [(Path(p), load_metrics(p)) for p in paths]
    for p, records in runs:
        if not records:
            raise ValueError(f"{p}: no records to plot")
        if x != "step" and not any(x in r for r in records):
            raise ValueError(f"{p}: records have no '{x}' field; plot with x='step'")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (path, records) in enumerate(runs):
        color = colors[i % len(colors)]
        label = labels[i] if labels is not None else _label(path)
        _draw_run(axes.flat, records, x, color, label)
    for ax, (_, name) in zip(axes.flat, _PANELS):
        ax.set_title(name)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _draw_run(axes: Any, records: Sequence[dict[str, Any]], x: str, color: str, label: str) -> None:
    loss_ax, lr_ax, norm_ax, scale_ax, speed_ax, mem_ax = axes
    loss_ax.plot(*_series(records, "loss", x), color=color, label=label)
    loss_ax.plot(*_series(records, "loss_mean", x), color=color, linestyle="--", alpha=0.6)
    lr_ax.plot(*_series(records, "lr", x), color=color)
    norm_ax.plot(*_series(records, "grad_norm", x), color=color)
    xs, scales = _series(records, "loss_scale", x)
    scale_ax.plot(xs, scales, color=color)
    if scales and min(scales) > 0:
        scale_ax.set_yscale("log")
    skipped = [(r[x], r.get("loss_scale") or 1.0) for r in records
               if r.get("skipped") and isinstance(r.get(x), (int, float))]
    if skipped:
        scale_ax.scatter(*zip(*skipped), marker="x", color=color, s=40, zorder=3)
    speed_key = "tokens_per_second" if any(r.get("tokens_per_second") for r in records) else "samples_per_second"
    speed_ax.plot(*_series(records, speed_key, x), color=color)
    speed_ax.set_ylabel(speed_key.replace("_per_second", "/s"))
    mx, mem = _series(records, "peak_memory_bytes", x)
    mem_ax.plot(mx, [m / 2**30 for m in mem], color=color)


def plot(
    metrics: Annotated[
        list[Path], typer.Argument(metavar="METRICS...", help="metrics.jsonl files or run directories.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image to write (.png, .svg, .pdf).")],
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Legend label, once per run.")
    ] = None,
    x: Annotated[str, typer.Option("--x", help="x-axis: step, samples or tokens.")] = "step",
    title: Annotated[str | None, typer.Option("--title", help="Figure title.")] = None,
) -> None:
    """Plot loss, lr, grad norm, loss scale (skipped steps marked), throughput and memory."""
    from funczero.monitors.events import MissingExtraError

    try:
        out = plot_runs(metrics, output, labels=label or None, x=x, title=title)
    except (MissingExtraError, ValueError, FileNotFoundError) as e:
        typer.echo(f"funczero plot: error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out}")
