"""read_metrics and MetricsLogger: one sync per interval, metrics.jsonl, skipped-step reports."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from funczero.train.metrics import (
    LossScaleAtMinimumError,
    MetricsLogger,
    format_record,
    load_metrics,
    read_metrics,
)


def step_metrics(loss: float = 1.0, *, skipped: int = 0, overflow: bool | None = None,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    m = {
        "loss": torch.tensor(loss, device=device),
        "grad_norm": torch.tensor(0.5, device=device),
        "lr": torch.tensor(1e-3, device=device),
        "loss_scale": torch.tensor(1024.0, device=device),
        "skipped": torch.tensor(skipped, device=device),
    }
    if overflow is not None:
        m["overflow_at_min_scale"] = torch.tensor(overflow, device=device)
    return m


def test_read_metrics_warns_on_a_skipped_step() -> None:
    with pytest.warns(RuntimeWarning, match="step 3: gradients were not finite"):
        out = read_metrics(step_metrics(skipped=1), step=3)
    assert out["skipped"] == 1.0 and out["loss"] == 1.0


def test_read_metrics_raises_at_min_scale_when_asked() -> None:
    with pytest.raises(LossScaleAtMinimumError, match="step 7"):
        read_metrics(step_metrics(skipped=1, overflow=True), step=7, raise_at_min_scale=True)


def test_logger_writes_one_record_per_interval(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, samples_per_step=8, log_every=3, tokens_per_sample=16,
                       echo=False, rank=0) as logger:
        for step in range(1, 10):
            record = logger.log(step, step_metrics(loss=float(step)))
            assert (record is not None) == (step % 3 == 0)
    records = load_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6, 9]
    r = records[1]
    assert r["samples"] == 48 and r["tokens"] == 48 * 16
    assert r["loss"] == 6.0 and r["loss_mean"] == pytest.approx(5.0)  # steps 4, 5, 6
    assert records[0]["loss_mean"] == pytest.approx(2.0)  # steps 1, 2, 3
    assert r["lr"] == pytest.approx(1e-3) and r["grad_norm"] == 0.5 and r["loss_scale"] == 1024.0
    assert r["skipped"] == 0 and r["overflow_at_min_scale"] == 0
    assert r["step_time"] > 0 and r["tokens_per_second"] == pytest.approx(
        8 * 16 / r["step_time"], rel=1e-6)
    assert r["memory_kind"] == "host_max_rss" and r["peak_memory_bytes"] > 0
    assert "mfu" not in r  # no FLOPs per token given


def test_non_log_steps_never_read_the_device(tmp_path: Path) -> None:
    # Meta tensors cannot be read on the host: any sync on a non-log step would raise.
    logger = MetricsLogger(tmp_path, samples_per_step=1, log_every=100, echo=False, rank=0)
    for step in range(1, 50):
        assert logger.log(step, step_metrics(device="meta", overflow=False)) is None
    logger.close()


def test_a_log_step_syncs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = torch.Tensor.tolist

    def counting(self: torch.Tensor) -> object:
        calls.append(self.shape)
        return original(self)

    logger = MetricsLogger(tmp_path, samples_per_step=1, log_every=5, echo=False, rank=0)
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    for step in range(1, 11):
        logger.log(step, step_metrics())
    logger.close()
    assert len(calls) == 2


def test_skipped_step_between_log_steps_is_reported(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, samples_per_step=1, log_every=4, echo=False, rank=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 9):
            logger.log(step, step_metrics(skipped=int(step == 6)))
    logger.close()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "steps 5-8: 1 step(s) had non-finite gradients" in messages[0]
    assert [r["skipped"] for r in load_metrics(tmp_path)] == [0, 1]


def test_overflow_at_min_scale_raises_at_the_next_log_step(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, samples_per_step=1, log_every=10, echo=False, rank=0,
                           raise_at_min_scale=True)
    logger.log(1, step_metrics(overflow=False))
    logger.log(2, step_metrics(skipped=1, overflow=True))  # not a log step: no sync, no raise
    with pytest.raises(LossScaleAtMinimumError, match="steps 3-3|steps 1-3"):
        logger.log(3, step_metrics(overflow=False), force=True)
    logger.close()


def test_overflow_at_min_scale_warns_by_default(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, samples_per_step=1, log_every=2, echo=False, rank=0) as logger:
        logger.log(1, step_metrics(overflow=False))
        with pytest.warns(RuntimeWarning, match="overflowed with the loss scale at its minimum"):
            logger.log(2, step_metrics(skipped=1, overflow=True))


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "r1", samples_per_step=1, log_every=1, rank=1) as logger:
        assert logger.log(1, step_metrics()) is not None  # every rank gets the record
    assert not (tmp_path / "r1").exists()


def test_mfu_and_flops_when_flops_per_token_and_peak_are_known(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, samples_per_step=4, log_every=2, tokens_per_sample=10,
                       flops_per_token=1e6, peak_flops=1e9, world_size=2, echo=False,
                       rank=0) as logger:
        for step in range(1, 5):
            record = logger.log(step, step_metrics())
    assert record is not None
    assert record["flops_per_step"] == 4 * 10 * 1e6
    assert record["mfu"] == pytest.approx(1e6 * record["tokens_per_second"] / 2e9)


def test_non_finite_loss_is_strict_json_and_reads_back(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, samples_per_step=1, log_every=1, echo=False, rank=0) as logger:
        logger.log(1, step_metrics(loss=float("nan")))
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert math.isnan(load_metrics(tmp_path)[0]["loss"])


def test_resumed_run_appends_and_later_records_win(tmp_path: Path) -> None:
    for losses in ([3.0, 2.0], [1.5]):  # the second run resumes from step 1 and redoes step 2
        with MetricsLogger(tmp_path, samples_per_step=1, log_every=1, echo=False, rank=0) as lg:
            first = 3 - len(losses)
            for i, loss in enumerate(losses):
                lg.log(first + i, step_metrics(loss=loss))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert [(r["step"], r["loss"]) for r in load_metrics(tmp_path)] == [(1, 3.0), (2, 1.5)]


def test_bad_arguments_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_every=0"):
        MetricsLogger(tmp_path, samples_per_step=1, log_every=0)
    with pytest.raises(KeyError, match="no 'loss'"):
        MetricsLogger(tmp_path, samples_per_step=1, rank=0).log(1, {"lr": torch.tensor(1.0)})


def test_load_metrics_rejects_a_file_that_is_not_metrics(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="needs a 'step' field"):
        load_metrics(tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        load_metrics(tmp_path / "missing")


def test_echo_prints_the_record_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with MetricsLogger(tmp_path, samples_per_step=1, log_every=1, rank=0) as logger:
        logger.log(1, step_metrics(loss=2.0))
    assert capsys.readouterr().out.startswith("step     1 | loss 2.0000 | lr 1.00e-03")
    assert "MFU 50.0%" in format_record({"step": 1, "mfu": 0.5})


def test_logger_from_config_with_a_real_train_step(tmp_path: Path) -> None:
    import funczero

    config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 2,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "fp16": {"enabled": True, "initial_scale_power": 4},
              "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"),
                              "job_name": "job"}}
    run = funczero.initialize(torch.nn.Linear(3, 1), config,
                              lambda m, b: ((m(b[0].half()).float() - b[1]) ** 2).mean())
    state = run.state
    batch = (torch.ones(4, 3), torch.zeros(4, 1))
    with MetricsLogger.from_config(run.config, tmp_path, echo=False, rank=0) as logger:
        assert logger.log_every == 2 and logger.samples_per_step == 4
        for _ in range(4):
            state, metrics = run.train_step(state, batch)
            logger.log(int(state.step), metrics)
    records = load_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4] and records[-1]["loss_scale"] == 16.0
    assert (tmp_path / "csv" / "job" / "Train_Samples_loss_scale.csv").read_text().split() == [
        "step,loss_scale", "8,16.0", "16,16.0"]
