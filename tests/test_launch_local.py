"""Single-node launches with real worker processes: env protocol, logs, failures, signals."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from launch_helpers.common import (
    HELPERS,
    finish,
    kill_leftovers,
    launch_env,
    read_pids,
    read_records,
    run_launch,
    running,
    start_launch,
    wait_for,
)

CRASH = str(HELPERS / "crash.py")
DUMP = str(HELPERS / "dump_env.py")
SLEEPER = str(HELPERS / "sleeper.py")
TRICKY_ARGS = ["two words", 'it\'s "quoted"', "$HOME", "semi;colon", "100%n", ""]


def test_each_worker_gets_the_rank_environment_and_intact_arguments(tmp_path: Path) -> None:
    (tmp_path / ".funczero_env").write_text('FROM_ENV_FILE=yes\nTRICKY="a b $HOME `x`"\n')
    env = launch_env(tmp_path, {"SLURM_PROCID": "7", "HOME": str(tmp_path)})
    result = run_launch(
        ["--num_gpus", "2", "--master_port", "0", DUMP, *TRICKY_ARGS], cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path)
    assert sorted(records) == [0, 1]
    port = records[0]["MASTER_PORT"]
    assert port != "0" and int(port) > 0
    for rank, rec in records.items():
        assert rec["RANK"] == rec["LOCAL_RANK"] == str(rank)
        assert rec["WORLD_SIZE"] == rec["LOCAL_WORLD_SIZE"] == "2"
        assert (rec["NODE_RANK"], rec["MASTER_ADDR"], rec["MASTER_PORT"]) == (
            "0",
            "127.0.0.1",
            port,
        )
        assert rec["argv"] == [f"--local_rank={rank}", *TRICKY_ARGS]
        assert (rec["FROM_ENV_FILE"], rec["TRICKY"]) == ("yes", "a b $HOME `x`")
        assert rec["CUDA_VISIBLE_DEVICES"] is None  # CPU pool: no devices to assign
        assert rec["SLURM_PROCID"] is None  # the launcher's scheduler rank is not inherited
        assert rec["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert "[rank0]: stdout line from rank 0" in result.stdout
    assert "[rank1]: stderr line from rank 1" in result.stderr


def test_module_and_no_python_modes_and_no_local_rank(tmp_path: Path) -> None:
    env = launch_env(tmp_path)
    result = run_launch(
        ["--master_port", "0", "--module", "--no_local_rank", "launch_helpers.dump_env", "x"],
        cwd=HELPERS.parent,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert read_records(tmp_path)[0]["argv"] == ["x"]
    script = str(HELPERS / "no_python_worker.sh")
    result = run_launch(
        ["--num_gpus", "2", "--master_port", "0", "--no_python", script, "a b"],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "np-1.txt").read_text().splitlines() == ["1", "--local_rank=1", "a b"]


def test_log_dir_writes_one_log_per_rank_with_both_streams(tmp_path: Path) -> None:
    logs = tmp_path / "logs" / "run1"
    result = run_launch(
        ["--num_gpus", "2", "--master_port", "0", "--log_dir", str(logs), DUMP],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in logs.iterdir()) == ["rank-00000.log", "rank-00001.log"]
    text = (logs / "rank-00001.log").read_text()
    assert "stdout line from rank 1" in text and "stderr line from rank 1" in text
    assert "[rank1]: stdout line from rank 1" in result.stdout


def test_failing_worker_stops_the_others_and_its_exit_code_is_returned(tmp_path: Path) -> None:
    proc = start_launch(
        [
            "--num_gpus",
            "3",
            "--master_port",
            "0",
            "--kill_timeout",
            "5",
            "--log_dir",
            "logs",
            SLEEPER,
            "--fail-rank",
            "1",
            "--code",
            "7",
        ],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    pids = read_pids(tmp_path, 3)
    try:
        code, _, err = finish(proc)
    finally:
        kill_leftovers(pids)
    assert code == 7, err
    assert "rank 1 (node 0 localhost, local rank 1" in err and "exited with code 7" in err
    assert "stopping 2 other worker(s)" in err
    assert "full log of rank 1: logs/rank-00001.log" in err
    stdout_tail = err[
        err.index("last 10 stdout line(s) of rank 1") : err.index("stderr line(s) of rank 1")
    ]
    assert "| rank 1 log line 29" in stdout_tail and "log line 19\n" not in stdout_tail
    assert "| rank 1 failing with code 7" in err[err.index("last 1 stderr line(s) of rank 1") :]
    assert not [pid for pid in pids if running(pid)]


def test_worker_killed_by_a_signal_gives_128_plus_the_signal(tmp_path: Path) -> None:
    proc = start_launch(
        [
            "--num_gpus",
            "2",
            "--master_port",
            "0",
            "--kill_timeout",
            "5",
            SLEEPER,
            "--signal-rank",
            "0",
            "--signal",
            str(int(signal.SIGKILL)),
        ],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    pids = read_pids(tmp_path, 2)
    try:
        code, _, err = finish(proc)
    finally:
        kill_leftovers(pids)
    assert code == 128 + signal.SIGKILL, err
    assert "rank 0" in err and "was killed by SIGKILL" in err
    assert not [pid for pid in pids if running(pid)]


def test_sigterm_kills_whole_worker_tree_and_exits_143(tmp_path: Path) -> None:
    pid_file = tmp_path / "launcher.pid"
    proc = start_launch(
        ["--num_gpus", "2", "--master_port", "0", "--save_pid", str(pid_file), SLEEPER],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    pids = read_pids(tmp_path, 2)
    try:
        assert pid_file.read_text().strip() == str(proc.pid)  # --save_pid names the launcher
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
    finally:
        kill_leftovers(pids)
    assert code == 143, err
    assert "received SIGTERM" in err
    # Gone entirely: killed and reaped (no zombies), grandchildren included.
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    assert not pid_file.exists()


def test_sigint_escalates_to_sigkill_after_kill_timeout_and_exits_130(tmp_path: Path) -> None:
    proc = start_launch(
        ["--num_gpus", "2", "--master_port", "0", "--kill_timeout", "1", SLEEPER, "--ignore-term"],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    pids = read_pids(tmp_path, 2)  # reported once every process ignores SIGTERM
    try:
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code, _, err = finish(proc)
        elapsed = time.monotonic() - start
    finally:
        kill_leftovers(pids)
    assert code == 130, err
    assert elapsed >= 1.0  # SIGTERM was ignored; SIGKILL came after --kill_timeout
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def test_sigint_works_even_when_the_test_itself_started_with_sigint_ignored(
    tmp_path: Path,
) -> None:
    # `pytest &` in a script starts with SIGINT ignored; the helpers restore it for the launcher.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = start_launch(
            ["--num_gpus", "1", "--kill_timeout", "5", SLEEPER],
            cwd=tmp_path,
            env=launch_env(tmp_path),
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    pids = read_pids(tmp_path, 1)
    try:
        proc.send_signal(signal.SIGINT)
        code, _, err = finish(proc)
    finally:
        kill_leftovers(pids)
    assert code == 130, err
    assert "received SIGINT" in err


@pytest.mark.parametrize("escape", ["group", "session", "jobshell"])
def test_sigterm_stops_grandchildren_that_left_the_workers_group_or_session(
    tmp_path: Path, escape: str
) -> None:
    proc = start_launch(
        ["--num_gpus", "1", "--kill_timeout", "1", SLEEPER, "--escape", escape, "--ignore-term"],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    pids = read_pids(tmp_path, 1)
    try:
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
    finally:
        kill_leftovers(pids)
    assert code == 143, err
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]  # killed and reaped


@pytest.mark.parametrize("escape", ["group", "session", "jobshell"])
def test_launcher_killed_with_sigkill_leaves_no_grandchild_in_another_group_or_session(
    tmp_path: Path, escape: str
) -> None:
    proc = start_launch(
        ["--num_gpus", "1", "--kill_timeout", "1", SLEEPER, "--escape", escape, "--ignore-term"],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    pids = read_pids(tmp_path, 1)
    try:
        proc.kill()  # SIGKILL: no handler of the launcher runs
        proc.communicate(timeout=30)
        # The keeper gets the parent-death signal and stops its tree: SIGTERM is ignored
        # here, so SIGKILL after --kill_timeout 1. Bounded, with room for a loaded machine.
        wait_for(lambda: not [pid for pid in pids if running(pid)], 30, "the whole tree to die")
    finally:
        kill_leftovers(pids)


def test_launcher_killed_with_sigkill_does_not_leave_workers_running(tmp_path: Path) -> None:
    proc = start_launch(
        ["--num_gpus", "2", "--master_port", "0", "--kill_timeout", "1", SLEEPER],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    pids = read_pids(tmp_path, 2)
    try:
        proc.kill()  # SIGKILL: no handler runs in the launcher
        proc.communicate(timeout=30)
        # Keepers: parent-death signal; each stops its worker's whole tree.
        wait_for(lambda: not [pid for pid in pids if running(pid)], 20, "workers to die")
    finally:
        kill_leftovers(pids)


def test_bind_cores_to_rank_pins_each_rank_and_sets_omp_threads(tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    result = run_launch(
        [
            "--num_gpus",
            "2",
            "--master_port",
            "0",
            "--bind_cores_to_rank",
            "--bind_core_list",
            f"{cores[0]},{cores[1]}",
            DUMP,
        ],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path)
    assert [records[r]["affinity"] for r in (0, 1)] == [[cores[0]], [cores[1]]]
    assert records[0]["OMP_NUM_THREADS"] == "1"


def test_dry_run_prints_each_rank_command_and_runs_nothing(tmp_path: Path) -> None:
    result = run_launch(
        ["--num_gpus", "2", "--master_port", "29555", "--dry_run", DUMP, "a b"],
        cwd=tmp_path,
        env=launch_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "world size 2, master 127.0.0.1:29555" in result.stdout
    assert "env RANK=1 WORLD_SIZE=2 LOCAL_RANK=1" in result.stdout
    assert f"{DUMP} --local_rank=1 'a b'" in result.stdout
    assert not list(tmp_path.glob("rank-*.json"))


def test_gloo_all_reduce_runs_through_the_launcher(tmp_path: Path) -> None:
    result = run_launch(
        ["--num_gpus", "2", "--master_port", "0", str(HELPERS / "allreduce.py")],
        cwd=tmp_path,
        env=launch_env(tmp_path),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path, "allreduce-*.json")
    assert {r: (v["world_size"], v["sum"]) for r, v in records.items()} == {
        0: (2, 3.0),
        1: (2, 3.0),
    }
    json.dumps(records)


def test_the_same_traceback_on_every_rank_is_printed_once_with_one_prefix(tmp_path: Path) -> None:
    result = run_launch(
        ["--num_gpus", "3", CRASH, "--same"], cwd=tmp_path, env=launch_env(tmp_path)
    )
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert err.count("Traceback (most recent call last):") == 1, err
    assert err.count("RuntimeError: the same bug on every rank") == 1, err
    assert "]: [rank" not in err  # torch's prefix and ours: one is shown
    assert err.count("(traceback identical to rank ") == 2, err
    for rank in range(3):
        assert f"[rank{rank}]: rank {rank} starting" in err


def test_different_tracebacks_are_each_printed_once(tmp_path: Path) -> None:
    result = run_launch(
        ["--num_gpus", "2", "--log_dir", "logs", CRASH], cwd=tmp_path, env=launch_env(tmp_path)
    )
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert err.count("Traceback (most recent call last):") == 2, err
    for rank in range(2):
        assert err.count(f"RuntimeError: bug of rank {rank}") == 1, err
        # The log keeps the rank's whole output, without torch's prefix.
        log = (tmp_path / "logs" / f"rank-0000{rank}.log").read_text()
        assert f"RuntimeError: bug of rank {rank}" in log and "[rank" not in log
    failed = int(err.split("funczero launch: rank ")[1].split()[0])
    report = err[err.index(f"stderr line(s) of rank {failed}:") :]
    assert f'  |   File "{CRASH}"' in report  # the failing rank's traceback, in the report


def test_a_port_in_use_gets_a_hint_in_the_failure_report(tmp_path: Path) -> None:
    script = tmp_path / "taken.py"
    script.write_text(
        "import sys\n"
        "print('torch.distributed.DistNetworkError: The server socket has failed to listen on "
        "any local network address. port: 29577, useIpv6: false, code: -98, name: "
        "EADDRINUSE, message: address already in use', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    result = run_launch(
        ["--node_rank", "1", "--num_nodes", "2", "--master_addr", "127.0.0.1",
         "--master_port", "29577", str(script)],
        cwd=tmp_path, env=launch_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "hint: the rendezvous port 29577 is in use on the master host" in result.stderr
