from __future__ import annotations

import os
from pathlib import Path

import pytest
from launch_helpers.common import HELPERS, launch_env, run_launch

from funczero.parallel.env import detect, shutdown

#: Runs of the exit test. Each costs two torch imports (about 5 s of CPU), so CI runs a few;
#: set FUNCZERO_TEST_EXIT_RUNS=30 (or more) to check a teardown change properly.
EXIT_RUNS = int(os.environ.get("FUNCZERO_TEST_EXIT_RUNS", "4"))


def test_plain_python_is_world_size_one() -> None:
    t = detect({})
    assert (t.rank, t.world_size, t.local_rank, t.source) == (0, 1, 0, "single")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
            (3, 4, 1, 2, "launcher"),
        ),
        (
            {
                "OMPI_COMM_WORLD_RANK": "5",
                "OMPI_COMM_WORLD_SIZE": "8",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
            },
            (5, 8, 1, 4, "openmpi"),
        ),
        (
            {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"},
            (2, 4, 0, 2, "mpich"),
        ),
        (
            {
                "SLURM_PROCID": "7",
                "SLURM_NTASKS": "8",
                "SLURM_LOCALID": "3",
                "SLURM_NTASKS_PER_NODE": "4(x2)",
            },
            (7, 8, 3, 4, "slurm"),
        ),
    ],
)
def test_ranks_come_from_launcher_mpi_or_slurm_variables(env, expected) -> None:
    t = detect(env)
    assert (t.rank, t.world_size, t.local_rank, t.local_world_size, t.source) == expected


def test_launcher_variables_win_over_slurm() -> None:
    t = detect({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (t.rank, t.world_size) == (1, 2)


def test_bad_values_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="outside"):
        detect({"RANK": "2", "WORLD_SIZE": "2"})


def test_shutdown_without_a_group_is_a_no_op() -> None:
    shutdown()
    shutdown()


def test_finished_two_rank_jobs_exit_0_every_time(tmp_path: Path) -> None:
    # The worker never destroys its group; funczero's exit hook must, or gloo may abort
    # the finished process ("terminate called without an active exception", exit 134).
    failures = []
    for run in range(EXIT_RUNS):
        result = run_launch(
            ["--num_gpus", "2", str(HELPERS / "trivial_worker.py")],
            cwd=tmp_path,
            env=launch_env(tmp_path),
            timeout=120,
        )
        if result.returncode != 0 or "terminate called" in result.stderr:
            failures.append(f"run {run}: exit {result.returncode}\n{result.stderr[-2000:]}")
        assert "[rank1]: rank 1 done" in result.stdout, result.stderr
    assert not failures, "\n".join(failures)


def test_shutdown_destroys_only_the_group_init_distributed_created(tmp_path: Path) -> None:
    result = run_launch(
        ["--num_gpus", "2", str(HELPERS / "shutdown_worker.py")],
        cwd=tmp_path,
        env=launch_env(tmp_path),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("checks passed") == 2


def _config_warning_worker(rank: int, world: int, out_dir: str) -> None:
    import warnings
    from pathlib import Path

    from funczero.config import Config
    from funczero.parallel.env import init_distributed

    init_distributed()
    with warnings.catch_warnings(record=True) as caught:
        Config.load({"train_batch_size": 8 * world, "prescale_gradients": True}, world_size=world)
    Path(out_dir, f"rank{rank}").write_text(str(len(caught)))


def test_config_warnings_show_on_rank_0_only(tmp_path) -> None:
    from funczero.testing.distributed import run_distributed

    run_distributed(_config_warning_worker, 2, str(tmp_path), timeout=120)
    assert (tmp_path / "rank0").read_text() == "1"
    assert (tmp_path / "rank1").read_text() == "0"
