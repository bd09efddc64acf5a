"""DeepSpeed's monitor blocks: settings, the CSV/TensorBoard/W&B/Comet writers and the hub."""

from __future__ import annotations

import csv
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from funczero.monitors.events import MissingExtraError
from funczero.monitors.hub import MonitorHub, deepspeed_events
from funczero.monitors.settings import (
    CometSettings,
    CSVSettings,
    MonitorSettings,
    MonitorSettingsError,
    TensorBoardSettings,
    WandbSettings,
)

EVENTS = [("Train/Samples/train_loss", 2.5, 32), ("Train/Samples/lr", 0.001, 32)]


def test_settings_have_deepspeeds_defaults() -> None:
    s = MonitorSettings.from_deepspeed({})
    assert not s.enabled and not s.wall_clock_breakdown
    assert s.tensorboard == TensorBoardSettings(False, "", "DeepSpeedJobName")
    assert s.csv_monitor.log_dir == "DeepSpeedJobName"  # relative to the launch directory
    assert s.wandb == WandbSettings(False, None, None, "deepspeed")
    assert s.comet.samples_log_interval == 100
    assert (s.flops_profiler.profile_step, s.flops_profiler.top_modules) == (1, 1)


def test_settings_reject_unknown_keys_and_wrong_types_with_their_paths() -> None:
    with pytest.raises(MonitorSettingsError) as e:
        MonitorSettings.from_deepspeed({
            "tensorboard": {"enabled": "yes", "outputpath": "x"},
            "comet": {"samples_log_interval": 0}, "wall_clock_breakdown": 1,
        })
    text = str(e.value)
    assert "tensorboard.enabled: expected <class 'bool'>, got 'yes'" in text
    assert "unknown key 'tensorboard.outputpath'; did you mean 'output_path'?" in text
    assert "comet.samples_log_interval=0 must be >= 1" in text
    assert "wall_clock_breakdown: expected true or false, got 1" in text


def test_auto_means_the_default_as_in_deepspeed() -> None:
    assert MonitorSettings.from_deepspeed({"wandb": {"project": "auto"}}).wandb.project == "deepspeed"


def test_csv_monitor_writes_deepspeeds_files_and_appends_on_resume(tmp_path: Path) -> None:
    settings = MonitorSettings(csv_monitor=CSVSettings(True, str(tmp_path), "job"))
    for samples in (32, 64):  # two runs: the second resumes and appends
        with MonitorHub(settings, rank=0) as hub:
            hub.write_events([(n, v, samples) for n, v, _ in EVENTS])
    rows = list(csv.reader((tmp_path / "job" / "Train_Samples_train_loss.csv").open()))
    assert rows == [["step", "train_loss"], ["32", "2.5"], ["64", "2.5"]]
    assert (tmp_path / "job" / "Train_Samples_lr.csv").is_file()


def test_hub_writes_nothing_off_rank_zero(tmp_path: Path) -> None:
    settings = MonitorSettings(csv_monitor=CSVSettings(True, str(tmp_path), "job"))
    with MonitorHub(settings, rank=1) as hub:
        assert not hub.enabled
        hub.write_events(EVENTS)
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("block,extra,module", [
    ("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb"),
    ("comet", "comet", "comet_ml"),
])
def test_enabled_block_without_its_library_names_the_extra_on_every_rank(
    block: str, extra: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    settings = MonitorSettings.from_deepspeed({block: {"enabled": True}})
    for rank in (0, 3):
        with pytest.raises(MissingExtraError, match=rf"pip install 'funczero\[{extra}\]'"):
            MonitorHub(settings, rank=rank)


def test_events_match_deepspeeds_names_and_loss_scale_only_with_fp16() -> None:
    record = {"samples": 96, "loss": 2.0, "lr": 0.1, "loss_scale": 8.0, "grad_norm": 1.5,
              "tokens_per_second": None, "wall_clock_ms": {"forward": 3.0, "optimizer": 1.0}}
    names = {n: (v, s) for n, v, s in deepspeed_events(record, loss_scale=True)}
    assert names["Train/Samples/train_loss"] == (2.0, 96)
    assert names["Train/Samples/lr"] == (0.1, 96)
    assert names["Train/Samples/loss_scale"] == (8.0, 96)
    assert names["Train/Samples/elapsed_time_ms_forward"] == (3.0, 96)
    assert names["Train/Samples/elapsed_time_ms_step"] == (1.0, 96)
    assert names["Train/Samples/grad_norm"] == (1.5, 96)
    assert "Train/Samples/tokens_per_second" not in names  # unknown values are left out
    bf16 = {n for n, _, _ in deepspeed_events(record, loss_scale=False)}
    assert "Train/Samples/loss_scale" not in bf16


def test_tensorboard_events_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = MonitorSettings.from_deepspeed(
        {"tensorboard": {"enabled": True, "output_path": str(tmp_path), "job_name": "tb"}})
    with MonitorHub(settings, rank=0) as hub:
        hub.write_events(EVENTS)
        hub.write_events([("Train/Samples/train_loss", 2.0, 64)])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("Train/Samples/train_loss")]
    assert loss == [(32, 2.5), (64, 2.0)]
    assert [e.step for e in acc.Scalars("Train/Samples/lr")] == [32]


def test_wandb_offline_run_records_the_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = MonitorSettings.from_deepspeed(
        {"wandb": {"enabled": True, "project": "funczero-test", "group": "g"}})
    hub = MonitorHub(settings, rank=0)
    run = hub.writers[0].run
    assert run.project == "funczero-test" and run.group == "g"
    hub.write_events(EVENTS)
    first = dict(run.summary)
    hub.write_events([("Train/Samples/train_loss", 2.0, 64)])
    second = dict(run.summary)
    hub.close()
    assert first["_step"] == 32 and first["Train/Samples/train_loss"] == 2.5
    assert first["Train/Samples/lr"] == 0.001
    assert second["_step"] == 64 and second["Train/Samples/train_loss"] == 2.0
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


class FakeExperiment:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.logged, self.name, self.ended = kwargs, [], None, False

    def log_metric(self, name: str, value: float, step: int) -> None:
        self.logged.append((name, value, step))

    def set_name(self, name: str) -> None:
        self.name = name

    def end(self) -> None:
        self.ended = True


def test_comet_sends_each_event_at_most_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("comet_ml")
    fake.start = lambda **kw: FakeExperiment(**kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "comet_ml", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    settings = MonitorSettings(comet=CometSettings(
        enabled=True, samples_log_interval=100, project="p", experiment_name="n", online=False))
    hub = MonitorHub(settings, rank=0)
    experiment = hub.writers[0].experiment
    for samples in (32, 64, 132, 164, 232):
        hub.write_events([("Train/Samples/train_loss", 1.0, samples)])
    hub.close()
    assert [s for _, _, s in experiment.logged] == [32, 132, 232]
    assert experiment.kwargs["project"] == "p" and experiment.kwargs["online"] is False
    assert experiment.name == "n" and experiment.ended


def test_logger_feeds_the_monitors(tmp_path: Path) -> None:
    import torch

    from funczero.train.metrics import MetricsLogger

    settings = MonitorSettings.from_deepspeed(
        {"csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "j"}})
    metrics = {"loss": torch.tensor(2.0), "lr": torch.tensor(0.5),
               "loss_scale": torch.tensor(1.0), "skipped": torch.tensor(0)}
    with MetricsLogger(tmp_path / "run", samples_per_step=16, log_every=2, monitors=settings,
                       echo=False, rank=0) as logger:
        for step in range(1, 5):
            logger.log(step, metrics)
    rows = (tmp_path / "j" / "Train_Samples_train_loss.csv").read_text().split()
    assert rows == ["step,train_loss", "32,2.0", "64,2.0"]
    assert not (tmp_path / "j" / "Train_Samples_loss_scale.csv").exists()  # fp32: as DeepSpeed


def test_flops_profiler_without_a_flops_figure_is_refused_by_name(tmp_path: Path) -> None:
    from funczero.train.metrics import MetricsLogger

    settings = MonitorSettings.from_deepspeed({"flops_profiler": {"enabled": True}})
    with pytest.raises(ValueError, match="flops_profiler.enabled: funczero does not hook modules"):
        MetricsLogger(tmp_path, samples_per_step=1, monitors=settings, rank=0)


def test_flops_profiler_reports_at_profile_step(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from funczero.train.metrics import MetricsLogger

    out = tmp_path / "flops.txt"
    settings = MonitorSettings.from_deepspeed(
        {"flops_profiler": {"enabled": True, "profile_step": 3, "output_file": str(out)}})
    metrics = {"loss": torch.tensor(1.0)}
    with MetricsLogger(tmp_path, samples_per_step=2, log_every=2, monitors=settings,
                       tokens_per_sample=8, flops_per_token=1000.0, peak_flops=1e12,
                       echo=False, rank=0) as logger:
        for step in range(1, 7):
            logger.log(step, metrics)
    text = out.read_text()
    assert text.startswith("flops profiler (step 4") and "FLOPs per step (all ranks): 1.6e+04" in text
    assert "MFU:" in text
