"""funczero plot: PNGs of one or several runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from funczero.cli.app import app
from funczero.train.metrics import MetricsLogger


def write_run(run_dir: Path, *, skip_at: int | None = None, scale: float = 1.0) -> Path:
    with MetricsLogger(run_dir, samples_per_step=4, log_every=2, tokens_per_sample=8,
                       echo=False, rank=0) as logger:
        for step in range(1, 21):
            logger.log(step, {
                "loss": torch.tensor(scale * 4.0 / step), "lr": torch.tensor(1e-3 * step),
                "grad_norm": torch.tensor(1.0 / step), "loss_scale": torch.tensor(2.0**16),
                "skipped": torch.tensor(int(step == skip_at)),
            })
    return run_dir / "metrics.jsonl"


def test_plot_writes_a_png_of_several_runs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step's report
        a = write_run(tmp_path / "a", skip_at=7)
    b = write_run(tmp_path / "b", scale=1.2)
    out = tmp_path / "plots" / "runs.png"
    result = CliRunner().invoke(app, ["plot", str(a), str(tmp_path / "b"), "-o", str(out),
                                      "--label", "first", "--label", "second", "--x", "samples"])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert b != a


def test_plot_errors_exit_2_with_the_reason(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runner = CliRunner()
    result = runner.invoke(app, ["plot", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "no metrics file" in result.output
    run = write_run(tmp_path / "r")
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "x.png"), "-l", "a", "-l", "b"])
    assert result.exit_code == 2 and "2 labels for 1 runs" in result.output


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    run = write_run(tmp_path / "r")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    result = CliRunner().invoke(app, ["plot", str(run), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "pip install 'funczero[plot]'" in result.output
