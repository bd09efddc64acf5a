"""--elastic: torch.distributed.elastic restarts the group; the script resumes."""

from __future__ import annotations

import json
from pathlib import Path

from launch_helpers.common import (
    HELPERS,
    kill_leftovers,
    launch_env,
    read_pids,
    run_launch,
    running,
    start_launch,
    wait_for,
)

TRAIN = str(HELPERS / "elastic_train.py")
TOTAL_STEPS, FAIL_STEP = 8, 4


def _run(tmp_path: Path, max_restarts: int):
    return run_launch(
        [
            "--elastic",
            "--num_gpus",
            "2",
            "--master_port",
            "0",
            "--max_restarts",
            str(max_restarts),
            "--kill_timeout",
            "2",
            TRAIN,
            str(TOTAL_STEPS),
            str(FAIL_STEP),
        ],
        cwd=tmp_path,
        env=launch_env(tmp_path),
        timeout=120,
    )


def test_elastic_restart_resumes_from_progress_and_finishes_with_exit_0(tmp_path: Path) -> None:
    result = _run(tmp_path, max_restarts=1)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "crashed").exists()  # the failure really happened once
    assert "simulated crash at step 4" in result.stderr
    finals = read_finals(tmp_path)
    for rank in (0, 1):
        assert finals[rank]["step"] == TOTAL_STEPS
        assert finals[rank]["restart_count"] == 1  # one group restart by torch elastic
    # Rank 1 saved step 3, crashed at step 4, and resumed from its own progress file.
    assert finals[1]["resumed_from"] == FAIL_STEP - 1
    assert finals[0]["resumed_from"] >= 1


def test_elastic_with_max_restarts_0_fails_with_the_worker_exit_code(tmp_path: Path) -> None:
    result = _run(tmp_path, max_restarts=0)
    assert result.returncode == 13, result.stderr
    assert "rank 1" in result.stderr and "failed with exit code 13" in result.stderr
    assert not (tmp_path / "final-1.json").exists()


def test_elastic_agent_killed_with_sigkill_does_not_leave_workers_running(tmp_path: Path) -> None:
    # torchrun's agent orphans its workers here; funczero's wrapper and watchdog do not.
    # The grandchildren left the workers' sessions and ignore SIGTERM: only the keepers,
    # child subreapers holding each worker's tree, can still find and kill them.
    proc = start_launch(
        ["--elastic", "--num_gpus", "2", "--kill_timeout", "1",
         str(HELPERS / "sleeper.py"), "--escape", "session", "--ignore-term"],
        cwd=tmp_path, env=launch_env(tmp_path),
    )  # fmt: skip
    pids = read_pids(tmp_path, 2)
    try:
        proc.kill()
        proc.communicate(timeout=30)
        wait_for(lambda: not [pid for pid in pids if running(pid)], 30, "workers to die")
    finally:
        kill_leftovers(pids)


def test_elastic_dry_run_shows_the_rendezvous_and_local_rank_macro(tmp_path: Path) -> None:
    result = run_launch(
        ["--elastic", "--num_gpus", "2", "--max_nodes", "4", "--dry_run", TRAIN, "8", "4"],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert (
        "c10d rendezvous at 127.0.0.1:29500 id funczero-127.0.0.1-29500, nodes 1-4" in result.stdout
    )
    assert "max_restarts 3" in result.stdout
    assert f"{TRAIN} '--local_rank=${{local_rank}}' 8 4" in result.stdout


def read_finals(out_dir: Path) -> dict[int, dict]:
    """Load ``final-<rank>.json`` files."""
    return {
        int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out_dir.glob("final-*.json")
    }


def test_elastic_console_shows_one_rank_prefix_per_line(tmp_path: Path) -> None:
    result = run_launch(
        ["--elastic", "--num_gpus", "1", "--max_restarts", "0", str(HELPERS / "crash.py")],
        cwd=tmp_path,
        env=launch_env(tmp_path),
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "[rank0]: RuntimeError: bug of rank 0" in result.stderr
    assert "]: [rank" not in result.stderr
