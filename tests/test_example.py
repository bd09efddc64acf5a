"""The README's main job: the example trains, on one process and under ZeRO-3 on two."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from funczero.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_gpt.py"


def _losses(out: str) -> list[float]:
    return [float(m) for m in re.findall(r"loss (\d+\.\d+)", out)]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def test_example_loss_falls_on_one_process() -> None:
    env = _env()
    env.pop("OMP_NUM_THREADS")  # the example's own default: one thread per process
    proc = subprocess.run(
        [
            sys.executable, str(EXAMPLE), "--steps", "60", "--log-every", "20",
            # a DeepSpeed command line, as `deepspeed`/`funczero launch` would run it
            "--deepspeed", "--deepspeed_config", str(ROOT / "examples" / "configs" / "fp32.json"),
            "--local_rank=0",
        ],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "80 characters" in proc.stdout and "1 thread(s) per process" in proc.stdout
    assert re.findall(r"step +(\d+) \|", proc.stdout) == ["0", "20", "40", "59"], proc.stdout
    losses = _losses(proc.stdout)
    assert abs(losses[0] - math.log(80)) < 0.25, proc.stdout  # step 0: about uniform over 80
    assert losses[-1] < losses[0] - 1.0, proc.stdout
    assert "tokens/s" in proc.stdout and "trained steps 0-59 in" in proc.stdout


def test_example_trains_under_zero3_with_torchrun_on_two_ranks() -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), str(EXAMPLE),
            "--config", str(ROOT / "examples" / "configs" / "zero3.json"),
            "--steps", "20", "--log-every", "10",  # the default 0.42M model (d_model 64 spikes at this lr)
        ],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ZeRO stage 3" in proc.stdout
    losses = _losses(proc.stdout)
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout  # steps 0, 10 and 19


def _run(args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--d-model", "32", "--layers", "1", "--log-every", "2", *args],
        capture_output=True, text=True, timeout=240, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_example_resume_continues_exactly(tmp_path) -> None:
    full = _losses(_run(["--steps", "8"]))
    ckpt = str(tmp_path / "ckpt")
    _run(["--steps", "4", "--save-dir", ckpt, "--save-every", "4"])
    # Same total schedule: the resumed run must log exactly the uninterrupted run's last losses.
    out = _run(["--steps", "8", "--save-dir", ckpt, "--save-every", "4", "--resume"])
    assert "resumed from step 4" in out
    assert _losses(out) == full[2:], (full, out)
