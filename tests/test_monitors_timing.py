"""PhaseTimer: per-phase step times recorded without a sync, collected once per interval."""

from __future__ import annotations

import time

import pytest

from funczero.monitors.timing import NullTimer, PhaseTimer


def test_phases_add_up_per_step_and_reset_after_collect() -> None:
    timer = PhaseTimer("cpu")
    for _ in range(2):
        with timer.phase("forward"):
            time.sleep(0.02)
        for _ in range(2):  # a phase may run several times in one step (micro-batches)
            with timer.phase("backward"):
                time.sleep(0.02)
        timer.end_step()
    times = timer.collect()
    # sleeps are lower bounds; a loaded machine only makes them longer
    assert times["forward"] >= 19.0 and times["backward"] >= 38.0
    assert times["backward"] > times["forward"]
    assert timer.collect() == {}


def test_unbalanced_marks_are_errors() -> None:
    timer = PhaseTimer("cpu")
    with pytest.raises(RuntimeError, match="stop\\('reduce'\\) without start"):
        timer.stop("reduce")
    timer.start("forward")
    with pytest.raises(RuntimeError, match="started twice"):
        timer.start("forward")


def test_logger_records_the_breakdown(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from funczero.train.metrics import MetricsLogger, load_metrics

    timer = PhaseTimer("cpu")
    with MetricsLogger(tmp_path, samples_per_step=1, log_every=2, timer=timer, echo=False,
                       rank=0) as logger:
        for step in range(1, 3):
            with timer.phase("optimizer"):
                pass
            timer.end_step()
            logger.log(step, {"loss": torch.tensor(1.0)})
    assert set(load_metrics(tmp_path)[0]["wall_clock_ms"]) == {"optimizer"}
    assert NullTimer().collect() == {}
