"""Progress bars: rich on a terminal, plain lines otherwise, silent off rank 0."""

from __future__ import annotations

import io

import pytest

from funczero.progress import (
    TrainingProgress,
    TransferProgress,
    format_bytes,
    format_duration,
    progress_mode,
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_rank_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUNCZERO_PROGRESS", raising=False)
    assert progress_mode(io.StringIO(), rank=0) == "plain"
    assert progress_mode(Terminal(), rank=0) == "rich"
    assert progress_mode(Terminal(), rank=1) == "off"
    monkeypatch.setenv("FUNCZERO_PROGRESS", "plain")
    assert progress_mode(Terminal(), rank=0) == "plain"
    monkeypatch.setenv("FUNCZERO_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="FUNCZERO_PROGRESS='fancy'"):
        progress_mode(Terminal(), rank=0)


def test_plain_training_progress_appends_the_eta_to_record_lines() -> None:
    out = io.StringIO()
    bar = TrainingProgress(10, stream=out, rank=0)
    bar.update(5, loss=1.0)
    assert out.getvalue() == ""  # updates alone print nothing in plain mode
    bar.print("step 5 | loss 1.0000")
    bar.close()
    line = out.getvalue().strip()
    assert line.startswith("step 5 | loss 1.0000 | ETA 0:00:0")


def test_rich_training_progress_draws_step_loss_and_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUNCZERO_PROGRESS", raising=False)
    out = Terminal()
    with TrainingProgress(100, start_step=20, stream=out, rank=0) as bar:
        assert bar.mode == "rich"
        bar.update(40, loss=2.5, tokens_per_second=12345.0)
        bar.print("step 40 | loss 2.5000")
    text = out.getvalue()
    assert "40/100" in text and "loss 2.5000" in text and "12,345 tok/s" in text
    assert "step 40 | loss 2.5000" in text


def test_off_rank_zero_nothing_is_printed() -> None:
    out = Terminal()
    with TrainingProgress(10, stream=out, rank=2) as bar:
        bar.update(3, loss=1.0)
        bar.print("x")
    with TransferProgress(100, "load", stream=out, rank=2) as t:
        t.advance(100)
    assert out.getvalue() == ""


def test_plain_transfer_progress_is_rate_limited_and_ends_with_a_final_line() -> None:
    out = io.StringIO()
    with TransferProgress(4 * 2**20, "reshard", stream=out, rank=0, every_s=3600) as bar:
        for _ in range(4):
            bar(2**20)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first chunk, then the end (the rest fell inside every_s)
    assert lines[0].startswith("reshard: 1.0 MiB / 4.0 MiB (25%)")
    assert lines[1].startswith("reshard: 4.0 MiB / 4.0 MiB (100%)") and "/s, ETA 0:00:00" in lines[1]


def test_rich_transfer_progress_shows_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUNCZERO_PROGRESS", raising=False)
    out = Terminal()
    with TransferProgress(2 * 2**30, "save", stream=out, rank=0) as bar:
        bar.advance(2**30)
    assert "save" in out.getvalue() and "GiB" in out.getvalue()


def test_formatting_helpers() -> None:
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB"
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "?"
    with pytest.raises(ValueError, match="total_steps=1 is below start_step=5"):
        TrainingProgress(1, start_step=5, rank=0)


def test_logger_drives_the_progress_bar(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from funczero.train.metrics import MetricsLogger

    out = io.StringIO()
    bar = TrainingProgress(4, stream=out, rank=0)
    with MetricsLogger(tmp_path, samples_per_step=2, log_every=2, tokens_per_sample=4,
                       progress=bar, rank=0) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss": torch.tensor(3.0)})
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("step     4 | loss 3.0000")
    assert "tokens/s" in lines[1] and "| ETA " in lines[1]
    assert bar.step == 4 and bar.fields["loss"] == 3.0
