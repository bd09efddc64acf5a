"""Multi-node launches on one machine: fake ssh/pdsh on PATH, and --node_rank by hand.

The hostfile names this machine twice ('localhost' and '127.0.0.1'), so a
two-node job with two ranks per node really runs here, through the real runner
code, the real remote command strings and the real per-node launcher.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from launch_helpers.common import (
    HELPERS,
    finish,
    install_fake_tools,
    kill_leftovers,
    launch_env,
    read_pids,
    read_records,
    run_launch,
    running,
    start_launch,
    wait_for,
)

from funczero.launch.plan import free_port

DUMP = str(HELPERS / "dump_env.py")
SLEEPER = str(HELPERS / "sleeper.py")
TRICKY_ARGS = ["two words", 'it\'s "quoted"', "$HOME", "100%n %h %%", "a\\b"]


@pytest.fixture
def cluster(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "hosts").write_text(
        "# two 'nodes' that are both this machine\nlocalhost slots=2\n127.0.0.1 slots=2\n"
    )
    # The fake ssh/pdsh give the remote command a bare login environment: OUT_DIR and
    # FROM_ENV_FILE reach the workers only through the env file, PYTHONPATH only as PYTHON*.
    (tmp_path / ".funczero_env").write_text(f'OUT_DIR={tmp_path}\nFROM_ENV_FILE=x y \' "z"\n')
    env = launch_env(
        tmp_path,
        {
            "NCCL_DEBUG": "INFO",
            "UCX_TLS": "tcp",
            "UNEXPORTED": "secret",
            "HOME": str(tmp_path),
            "FAKE_SSH_LOG": str(tmp_path / "ssh.log"),
            "FAKE_PDSH_LOG": str(tmp_path / "pdsh.log"),
        },
        fake_bin=install_fake_tools(tmp_path),
    )
    return tmp_path, env


def _check_two_by_two(out_dir: Path, port: int, flags: tuple[str, ...] = ()) -> None:
    records = read_records(out_dir)
    assert sorted(records) == [0, 1, 2, 3]
    for rank, rec in records.items():
        assert (rec["RANK"], rec["WORLD_SIZE"], rec["LOCAL_WORLD_SIZE"]) == (str(rank), "4", "2")
        assert rec["NODE_RANK"] == str(rank // 2) and rec["LOCAL_RANK"] == str(rank % 2)
        assert (rec["MASTER_ADDR"], rec["MASTER_PORT"]) == ("localhost", str(port))
        assert rec["CUDA_VISIBLE_DEVICES"] == "0,1"  # hostfile slots are device ids
        assert rec["argv"] == [f"--local_rank={rank % 2}", *flags, *TRICKY_ARGS]
        # Exported: NCCL*, UCX*, the env file (content not shell-interpreted).
        assert (rec["NCCL_DEBUG"], rec["UCX_TLS"]) == ("INFO", "tcp")
        assert rec["FROM_ENV_FILE"] == 'x y \' "z"'
        assert rec["UNEXPORTED"] is None
        assert rec["cwd"] == str(out_dir)


def test_ssh_runner_starts_two_nodes_with_correct_global_ranks(
    cluster: tuple[Path, dict[str, str]],
) -> None:
    out_dir, env = cluster
    port = free_port()
    result = run_launch(
        ["-H", "hosts", "--master_port", str(port), DUMP, *TRICKY_ARGS], cwd=out_dir, env=env
    )
    assert result.returncode == 0, result.stderr
    _check_two_by_two(out_dir, port)
    calls = [json.loads(line) for line in (out_dir / "ssh.log").read_text().splitlines()]
    assert sorted(c["host"] for c in calls) == ["127.0.0.1", "localhost"]
    assert calls[0]["argv"][:2] == ["-o", "BatchMode=yes"]


@pytest.mark.parametrize("runner", ["ssh", "pdsh"])
def test_failure_on_one_node_stops_the_other_node_and_returns_its_code(
    cluster: tuple[Path, dict[str, str]], runner: str
) -> None:
    out_dir, env = cluster
    proc = start_launch(
        [
            "-H",
            "hosts",
            "--launcher",
            runner,
            "--master_port",
            str(free_port()),
            "--kill_timeout",
            "2",
            SLEEPER,
            "--fail-rank",
            "3",
            "--code",
            "9",
        ],
        cwd=out_dir,
        env=env,
    )
    pids = read_pids(out_dir, 4)
    try:
        code, _, err = finish(proc)
    finally:
        kill_leftovers(pids)
    assert code == 9, err
    assert "rank 3 (node 1 127.0.0.1, local rank 1" in err
    assert "node 1" in err and "stopping the other" in err
    assert not [pid for pid in pids if running(pid)]


def test_ssh_runner_killed_with_sigkill_stops_remote_workers(
    cluster: tuple[Path, dict[str, str]],
) -> None:
    out_dir, env = cluster
    proc = start_launch(
        ["-H", "hosts", "--master_port", str(free_port()), "--kill_timeout", "2", SLEEPER],
        cwd=out_dir,
        env=env,
    )
    pids = read_pids(out_dir, 4)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        # Each node's launcher sees its ssh connection close (stdin EOF) and stops.
        wait_for(lambda: not [pid for pid in pids if running(pid)], 30, "remote workers to stop")
    finally:
        kill_leftovers(pids)


def test_pdsh_runner_gives_correct_global_ranks_and_sigterm_stops_every_node(
    cluster: tuple[Path, dict[str, str]],
) -> None:
    out_dir, env = cluster
    port = free_port()
    proc = start_launch(
        [
            "-H",
            "hosts",
            "--launcher",
            "pdsh",
            "--master_port",
            str(port),
            "--kill_timeout",
            "2",
            SLEEPER,
            "--dump",
            *TRICKY_ARGS,
        ],
        cwd=out_dir,
        env=env,
    )
    pids = read_pids(out_dir, 4)
    try:
        wait_for(lambda: len(list(out_dir.glob("rank-*.json"))) == 4, 30, "4 env records")
        _check_two_by_two(out_dir, port, flags=("--dump",))
        (call,) = [json.loads(line) for line in (out_dir / "pdsh.log").read_text().splitlines()]
        assert call["argv"][:5] == ["-S", "-f", "1024", "-w", "localhost,127.0.0.1"]
        proc.send_signal(signal.SIGTERM)
        code, out, err = finish(proc)
    finally:
        kill_leftovers(pids)
    assert code == 143, err
    assert "localhost: [rank0]: rank 0 ready" in out  # pdsh's host prefix, then ours
    assert not [pid for pid in pids if running(pid)]


def test_node_rank_mode_two_launchers_on_localhost_form_one_gloo_world(tmp_path: Path) -> None:
    port = free_port()
    env = launch_env(tmp_path)
    common = [
        "--num_nodes",
        "2",
        "--num_gpus",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(HELPERS / "allreduce.py"),
    ]
    node1 = start_launch(["--node_rank", "1", *common], cwd=tmp_path, env=env)
    node0 = start_launch(["--node_rank", "0", *common], cwd=tmp_path, env=env)
    results = [finish(node0, 120), finish(node1, 120)]
    for code, _, err in results:
        assert code == 0, err
    records = read_records(tmp_path, "allreduce-*.json")
    assert {r: (v["world_size"], v["sum"]) for r, v in records.items()} == {
        0: (2, 3.0),
        1: (2, 3.0),
    }
    assert "node 1 (node1): starting ranks 1-1 of world size 2" in results[1][2]
