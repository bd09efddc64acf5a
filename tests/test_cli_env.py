"""funczero env and funczero --version."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import funczero
from funczero.cli.app import app


def test_version_flag_prints_the_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"funczero {funczero.__version__}"


def test_env_json_reports_versions_backends_and_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("WANDB_API_KEY", "do-not-print-me")
    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    assert "do-not-print-me" not in result.output
    report = json.loads(result.output)
    v = report["versions"]
    assert v["funczero"] == funczero.__version__ and v["torch"] == torch.__version__
    assert v["optree"] and v["safetensors"] and v["python"].count(".") == 2
    assert report["backends"]["gloo"] == "works"  # tried on a one-process group
    if not torch.cuda.is_available():
        assert report["backends"]["nccl"] != "works" and report["devices"] == []
    assert report["env"]["NCCL_DEBUG"] == "INFO"
    assert report["env"]["WANDB_API_KEY"] == "<set, not shown>"
    assert set(report["extras"]) >= {"tensorboard", "wandb", "comet_ml", "matplotlib"}


def test_env_table_names_each_section() -> None:
    result = CliRunner().invoke(app, ["env", "--no-backends"])
    assert result.exit_code == 0, result.output
    for word in ("funczero", "torch", "nccl", "backend gloo", "not tried", "CUDA"):
        assert word in result.output
