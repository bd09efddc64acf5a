from __future__ import annotations

import pytest

from funczero.parallel.env import detect


def test_plain_python_is_world_size_one() -> None:
    t = detect({})
    assert (t.rank, t.world_size, t.local_rank, t.source) == (0, 1, 0, "single")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, (3, 4, 1, 2, "launcher")),
        (
            {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"},
            (5, 8, 1, 4, "openmpi"),
        ),
        ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}, (2, 4, 0, 2, "mpich")),
        ({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "4(x2)"}, (7, 8, 3, 4, "slurm")),
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
