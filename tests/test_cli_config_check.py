"""funczero config check: a resolved table and exit 0, or every problem and exit 1."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from funczero.cli.app import app


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(text)
    return str(path)


def test_valid_config_prints_the_resolved_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """{
      // DeepSpeed configs may have comments
      "train_batch_size": 64, "gradient_accumulation_steps": 2,
      "bf16": {"enabled": true},
      "zero_optimization": {"stage": 2, "allgather_bucket_size": 2e8},
      "csv_monitor": {"enabled": true, "job_name": "run"}
    }""")
    result = CliRunner().invoke(app, ["config", "check", path, "--world-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    rows = {r["key"]: r for r in out["keys"]}
    assert out["ok"] and out["problems"] == []
    assert rows["train_micro_batch_size_per_gpu"]["value"] == "8"
    assert rows["train_micro_batch_size_per_gpu"]["origin"] == "computed"
    assert rows["zero_optimization.allgather_bucket_size"]["differs"].startswith("no effect:")
    assert rows["csv_monitor.job_name"]["value"] == "run"
    assert "zero_optimization.reduce_bucket_size" not in rows  # defaults only with --all
    every = json.loads(CliRunner().invoke(app, ["config", "check", path, "-w", "4", "--all",
                                                "--json"]).output)
    assert {r["key"]: r["origin"] for r in every["keys"]}["zero_optimization.reduce_bucket_size"] \
        == "default"
    table = CliRunner().invoke(app, ["config", "check", path, "-w", "4"])
    assert table.exit_code == 0 and "valid" in table.output and "allgather_bucket_size" in table.output
    assert "warning: zero_optimization.allgather_bucket_size" in table.output


def test_invalid_config_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path, """{"train_batch_size": 10, "zero_optimization": {"stag": 2},
                              "tensorboard": {"enabled": true, "outputpath": "x"}}""")
    result = CliRunner().invoke(app, ["config", "check", path, "-w", "4"])
    assert result.exit_code == 1
    assert "zero_optimization.stag" in result.output  # config and monitor problems together
    assert "unknown key 'tensorboard.outputpath'; did you mean 'output_path'?" in result.output
    result = CliRunner().invoke(app, ["config", "check", path, "-w", "1", "--json"])
    out = json.loads(result.output)
    assert result.exit_code == 1 and not out["ok"] and out["problems"]


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["config", "check", str(tmp_path / "nope.json")])
    assert result.exit_code == 1 and "does not exist" in result.output
