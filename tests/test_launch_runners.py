"""Runner command lines (ssh, pdsh, openmpi, mpich, slurm) and their quoting, via --dry_run.

mpirun and srun are not installed here, so their commands are checked as built:
every user argument must come back unchanged after the shell (or pdsh's ``%``
expansion and the remote shell) parses the printed command.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from launch_helpers.common import launch_env, run_launch
from launch_helpers.fake_pdsh import expand

from funczero.launch.errors import LaunchError
from funczero.launch.options import LaunchOptions
from funczero.launch.plan import Plan, make_plan
from funczero.launch.runners import mpi_command, pdsh_command, pdsh_stop_command, ssh_commands
from funczero.launch.spec import World

ARGS = ["two words", "it's", 'say "hi"', "$HOME", "`id`", "a;b|c&d", "100%n %h %%", "x,y=z", ""]
ENV = {"NCCL_SOCKET_IFNAME": "eth0,eth1", "PYTHONPATH": "/opt/my lib", "HOME": "/nonexistent"}


@pytest.fixture
def hostfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "hosts").write_text("node-a slots=2\nnode-b slots=2\nnode-c slots=1\n")
    return "hosts"


def _plan(hostfile: str, **kwargs: object) -> Plan:
    opts = LaunchOptions(script="train.py", script_args=tuple(ARGS), hostfile=hostfile)
    for name, value in kwargs.items():
        setattr(opts, name, value)
    return make_plan(opts, environ=ENV, local_gpus=0)


def _agent_tail(tokens: list[str]) -> list[str]:
    return tokens[tokens.index("--") + 1 :]


def test_ssh_remote_command_preserves_arguments_and_exports(hostfile: str) -> None:
    plan = _plan(hostfile, num_nodes=2, master_port=29555)
    commands = ssh_commands(plan)
    assert [c.argv[3] for c in commands] == ["node-a", "node-b"]
    for rank, command in enumerate(commands):
        remote = shlex.split(command.argv[-1])  # what the remote shell will see
        assert remote[:4] == ["cd", plan.cwd, "&&", "exec"]
        assert "NCCL_SOCKET_IFNAME=eth0,eth1" in remote and "PYTHONPATH=/opt/my lib" in remote
        assert remote[remote.index("--node_rank") + 1] == str(rank)
        assert "--watch_stdin" in remote
        assert remote[remote.index("--master_addr") + 1] == "node-a"
        assert _agent_tail(remote) == ["train.py", *ARGS]
        world = World.decode(remote[remote.index("--world_info") + 1])
        assert world.hosts == ["node-a", "node-b"]


def test_pdsh_command_survives_percent_expansion_and_finds_nodes_by_name(hostfile: str) -> None:
    plan = _plan(hostfile, launcher="pdsh", include="node-c@node-a:1", launcher_args="-R ssh")
    command = pdsh_command(plan)
    assert command.argv[:8] == ["pdsh", "-S", "-f", "1024", "-w", "node-a,node-c", "-R", "ssh"]
    assert command.env == {"PDSH_RCMD_TYPE": "ssh"}
    for rank, host in enumerate(["node-a", "node-c"]):
        remote = shlex.split(expand(command.argv[-1], host, rank))
        assert remote[remote.index("--node_host") + 1] == host
        assert _agent_tail(remote) == ["train.py", *ARGS]
    stop = pdsh_stop_command(plan).argv[-1]
    assert f"/tmp/funczero-{plan.job_id}-node*.pid" in stop and "kill -TERM" in stop


def test_openmpi_command_exports_master_and_keeps_arguments(hostfile: str) -> None:
    plan = _plan(hostfile, launcher="openmpi", num_nodes=3, launcher_args="--bind-to none")
    argv = mpi_command(plan).argv
    assert argv[:5] == ["mpirun", "-n", "5", "--host", "node-a:2,node-b:2,node-c:1"]
    assert argv[5:7] == ["--bind-to", "none"]
    exported = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert "MASTER_ADDR=node-a" in exported and "MASTER_PORT=29500" in exported
    assert "NCCL_SOCKET_IFNAME=eth0,eth1" in exported and "CUDA_VISIBLE_DEVICES=0,1" in exported
    program = argv[argv.index("-u") - 1 :]
    assert program[2:] == ["train.py", *ARGS]  # no --local_rank: ranks come from OMPI_COMM_WORLD_*


def test_mpich_command_uses_genv_pairs_and_equal_ranks_per_node(hostfile: str) -> None:
    plan = _plan(hostfile, launcher="mpich", num_nodes=2)
    argv = mpi_command(plan).argv
    assert argv[:7] == ["mpirun", "-n", "4", "-ppn", "2", "-hosts", "node-a,node-b"]
    pairs = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "-genv"}
    assert pairs["MASTER_ADDR"] == "node-a" and pairs["PYTHONPATH"] == "/opt/my lib"
    assert argv[-len(ARGS) - 1 :] == ["train.py", *ARGS]


def test_slurm_command_passes_exports_through_srun_environment(hostfile: str) -> None:
    plan = _plan(hostfile, launcher="slurm", exclude="node-c")
    command = mpi_command(plan)
    assert command.argv[:6] == [
        "srun", "--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--nodelist=node-a,node-b",
        "--export=ALL",
    ]  # fmt: skip
    # Values with commas cannot go through --export=K=V; they ride in srun's environment.
    assert command.env["NCCL_SOCKET_IFNAME"] == "eth0,eth1"
    assert command.env["MASTER_ADDR"] == "node-a" and "CUDA_VISIBLE_DEVICES" not in command.env
    tokens = shlex.split(command.render())
    assert tokens[0] == "env" and "NCCL_SOCKET_IFNAME=eth0,eth1" in tokens
    assert tokens[-len(ARGS) - 1 :] == ["train.py", *ARGS]


def test_mpi_runners_reject_hosts_with_different_slot_lists(hostfile: str) -> None:
    with pytest.raises(LaunchError, match="--launcher mpich gives every host the same device list"):
        mpi_command(_plan(hostfile, launcher="mpich"))  # node-c has 1 slot, the others 2
    with pytest.raises(LaunchError, match="host 'node-b' uses slots 1"):
        mpi_command(_plan(hostfile, launcher="openmpi", include="node-a@node-b:1"))


def test_slurm_without_hostfile_uses_num_nodes_and_needs_master_addr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    opts = LaunchOptions(script="train.py", launcher="slurm", num_nodes=4, num_gpus=8)
    with pytest.raises(
        LaunchError, match="--launcher slurm without a hostfile needs --master_addr"
    ):
        make_plan(opts, environ={}, local_gpus=0)
    opts = LaunchOptions(
        script="train.py", launcher="slurm", num_nodes=4, num_gpus=8, master_addr="n1"
    )
    argv = mpi_command(make_plan(opts, environ={}, local_gpus=0)).argv
    assert argv[:5] == ["srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--export=ALL"]


def test_cli_dry_run_prints_a_runnable_mpirun_line(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("node-a slots=2\nnode-b slots=2\n")
    result = run_launch(
        ["-H", "hosts", "--launcher", "openmpi", "--dry_run", "train.py", *ARGS],
        cwd=tmp_path,
        env=launch_env(tmp_path, {"HOME": str(tmp_path)}),
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("mpirun"))
    tokens = shlex.split(line)
    assert tokens[-len(ARGS) - 1 :] == ["train.py", *ARGS]
    assert "# node 1 (node-b): ranks 2-3, slots 0,1" in result.stdout
