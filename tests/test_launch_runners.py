"""Runner command lines (ssh, pdsh, openmpi, mpich, slurm) and their quoting, via --dry_run.

mpirun and srun are not installed here, so their commands are checked as built:
every user argument must come back unchanged after the shell (or pdsh's ``%``
expansion and the remote shell) parses the printed command.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pytest
from launch_helpers.common import launch_env, run_launch
from launch_helpers.fake_pdsh import expand

from funczero.launch.errors import LaunchError
from funczero.launch.launcher import render_plan
from funczero.launch.options import LaunchOptions
from funczero.launch.plan import Plan, make_plan
from funczero.launch.procs import ARG_STRLEN_MAX
from funczero.launch.runners import mpi_command, pdsh_commands, pdsh_stop_commands, ssh_commands
from funczero.launch.spec import decode_node_table

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


def _option(tokens: list[str], name: str) -> str:
    (value,) = [t.split("=", 1)[1] for t in tokens if t.startswith(f"{name}=")]
    return value


def test_ssh_remote_command_preserves_arguments_and_exports(hostfile: str) -> None:
    plan = _plan(hostfile, num_nodes=2, master_port=29555)
    commands = ssh_commands(plan)
    assert [c.argv[3] for c in commands] == ["node-a", "node-b"]
    for rank, command in enumerate(commands):
        remote = shlex.split(command.argv[-1])  # what the remote shell will see
        assert remote[:4] == ["cd", plan.cwd, "&&", "exec"]
        assert "NCCL_SOCKET_IFNAME=eth0,eth1" in remote and "PYTHONPATH=/opt/my lib" in remote
        assert "--watch_stdin" in remote
        assert _option(remote, "--master_addr") == "node-a"
        assert _agent_tail(remote) == ["train.py", *ARGS]
        # Each node gets only its own assignment, not the world.
        node = decode_node_table(_option(remote, "--nodes"))
        assert (node.host, node.node_rank, node.first_rank) == (
            ["node-a", "node-b"][rank],
            rank,
            2 * rank,
        )
        assert (node.world_size, node.num_nodes, node.slots) == (4, 2, (0, 1))


def test_pdsh_command_survives_percent_expansion_and_finds_nodes_by_name(hostfile: str) -> None:
    plan = _plan(hostfile, launcher="pdsh", include="node-c@node-a:1", launcher_args="-R ssh")
    (command,) = pdsh_commands(plan)
    assert command.argv[:8] == ["pdsh", "-S", "-f", "1024", "-w", "node-a,node-c", "-R", "ssh"]
    assert command.env == {"PDSH_RCMD_TYPE": "ssh"}
    for rank, host in enumerate(["node-a", "node-c"]):
        remote = shlex.split(expand(command.argv[-1], host, rank))
        assert _option(remote, "--node_host") == host
        node = decode_node_table(_option(remote, "--nodes"), host)
        assert (node.node_rank, node.first_rank, node.slots) == [(0, 0, (1,)), (1, 1, (0,))][rank]
        assert _agent_tail(remote) == ["train.py", *ARGS]
    (stop,) = pdsh_stop_commands(plan)
    assert stop.argv[:6] == ["pdsh", "-S", "-f", "1024", "-w", "node-a,node-c"]
    assert f"/tmp/funczero-{plan.job_id}-node*.pid" in stop.argv[-1]
    assert "kill -TERM" in stop.argv[-1]


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


def _big_hostfile(tmp_path: Path, hosts: int) -> str:
    path = tmp_path / "big-hosts"
    names = [f"worker-{i:05d}.rack-{i // 40:03d}.cluster.example.com" for i in range(hosts)]
    path.write_text("".join(f"{name} slots=8\n" for name in names))
    return str(path)


@pytest.mark.parametrize("launcher", ["ssh", "pdsh"])
def test_commands_for_4000_hosts_build_in_linear_time_and_stay_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    hostfile = _big_hostfile(tmp_path, 4000)
    opts = LaunchOptions(script="train.py", script_args=tuple(ARGS), hostfile=hostfile)
    opts.launcher = launcher
    start = time.perf_counter()
    plan = make_plan(opts, environ=ENV, local_gpus=0)
    commands = ssh_commands(plan) if launcher == "ssh" else pdsh_commands(plan)
    rendered = render_plan(plan)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"{elapsed:.1f}s to build 4000 nodes' commands"  # was 89 s
    assert plan.world.world_size == 32000
    for command in commands:
        assert max(len(arg.encode()) for arg in command.argv) < ARG_STRLEN_MAX
    if launcher == "ssh":
        assert len(commands) == 4000
        assert max(len(c.argv[-1]) for c in commands) < 4096  # one node's data, not the world's
    else:
        assert len(commands) >= 2  # batches, each under the per-argument limit
        assert [h for c in commands for h in c.argv[c.argv.index("-w") + 1].split(",")] == (
            plan.world.hosts
        )
        last = commands[-1]
        host = plan.world.hosts[-1]
        remote = shlex.split(expand(last.argv[-1], host, 0))
        node = decode_node_table(_option(remote, "--nodes"), host)
        assert (node.node_rank, node.first_rank, node.world_size) == (3999, 31992, 32000)
    assert rendered.count("\n# node ") == 4000


def test_building_is_linear_in_the_number_of_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    timings = []
    for hosts in (1000, 4000):
        opts = LaunchOptions(script="train.py", hostfile=_big_hostfile(tmp_path, hosts))
        start = time.perf_counter()
        ssh_commands(make_plan(opts, environ=ENV, local_gpus=0))
        timings.append(time.perf_counter() - start)
    # Linear: 4x the hosts costs about 4x (quadratic would be 16x); generous for noise.
    assert timings[1] < 10 * timings[0] + 0.5, timings


def test_remote_command_over_the_argument_limit_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostfile: str
) -> None:
    (tmp_path / ".funczero_env").write_text(f"BIG={'x' * 120_000}\n")
    with pytest.raises(LaunchError, match=r"the ssh command of node 0 \(node-a\) is [\d,]+ bytes"):
        ssh_commands(_plan(hostfile))
    with pytest.raises(LaunchError, match="the largest exported variable is BIG"):
        pdsh_commands(_plan(hostfile, launcher="pdsh"))
