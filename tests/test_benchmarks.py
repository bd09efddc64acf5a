"""Smoke test of the GPU benchmark's CPU mode: it runs and prints well-formed JSON lines.

``benchmarks/gpt_throughput.py --device cpu --tiny`` spawns 2 gloo processes and runs funczero
ZeRO 0-3, DDP and FSDP2 on a tiny GPT; only the shape of its output is checked here (the numbers
come from GPU runs, see docs/performance.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "impl": str,
    "world": int,
    "params_M": float,
    "step_ms_median": float,
    "step_ms_min": float,
    "tokens_per_s": int,
    "tflops_per_gpu": float,
    "mfu_vs_989": float,
    "peak_mem_gib_max": float,
    "loss": float,
}


def test_gpt_throughput_tiny_cpu_prints_one_json_line_per_system(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    systems = ["funczero-z0", "funczero-z1", "funczero-z2", "funczero-z3", "ddp", "fsdp2"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpt_throughput.py"), "--device", "cpu",
         "--tiny", "--nprocs", "2", "--systems", ",".join(systems), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout_lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    file_lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert stdout_lines == file_lines
    assert [r["impl"] for r in file_lines] == systems
    for r in file_lines:
        for key, kind in KEYS.items():
            assert isinstance(r[key], kind) or (kind is float and isinstance(r[key], int)), (key, r)
        assert r["world"] == 2
        assert r["tokens_per_s"] > 0 and r["step_ms_median"] > 0
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 10, r
    # Same data, same initial weights, 3 AdamW steps: every system lands on about the same loss.
    losses = [r["loss"] for r in file_lines]
    assert max(losses) - min(losses) < 0.05, losses


def test_offload_tiny_cpu_runs_with_and_without_offload_to_the_same_loss(tmp_path: Path) -> None:
    out = tmp_path / "offload.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "offload.py"), "--device", "cpu", "--tiny",
         "--systems", "fz2,fz2-off", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["impl"], r["stage"], r["offload"]) for r in rows] == [("fz2", 2, False), ("fz2-off", 2, True)]
    assert all(r["tokens_per_s"] > 0 and r["step_ms_median"] > 0 for r in rows)
    # Same model, data and AdamW: offload changes where the optimizer runs, not the trajectory.
    assert rows[0]["loss"] == rows[1]["loss"] and math.isfinite(rows[0]["loss"])
    assert "| fz2-off |" in proc.stderr


def test_hf_load_tiny_cpu_prints_one_json_line_per_system(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "hf_load.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hf_load.py"), "--device", "cpu", "--tiny",
         "--systems", "hf,funczero-z3", "--tmp", str(tmp_path), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["system"] for r in rows] == ["hf", "funczero-z3"]
    assert rows[0]["params"] == rows[1]["params"] > 100_000  # the same model, both ways
    for r in rows:
        assert r["load_s"] > 0 and r["GB_per_s"] > 0 and r["ckpt_GB"] > 0, r
        assert r["files"] > 1  # save_pretrained sharded it
    assert rows[0]["dtype"] == "bfloat16"  # from_pretrained was asked for bf16 and gave it
    assert rows[1]["stage"] == 3 and rows[1]["init_s"] > 0
    assert "| funczero-z3 |" in proc.stdout
    assert list(tmp_path.iterdir()) == [out]  # the checkpoint's temporary directory is gone
