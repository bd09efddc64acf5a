"""`funczero launch` command line: flags, one-line misuse errors, import cost."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers.common import CLI, REPO, launch_env
from typer.testing import CliRunner

from funczero.cli.app import app

FLAGS = [
    "--hostfile", "--include", "--exclude", "--num_nodes", "--num_gpus", "--nproc_per_node",
    "--master_addr", "--master_port", "--node_rank", "--launcher", "--launcher_args", "--module",
    "--no_python", "--no_local_rank", "--env_file", "--log_dir", "--save_pid",
    "--bind_cores_to_rank", "--elastic", "--min_nodes", "--max_nodes", "--max_restarts",
    "--kill_timeout", "--dry_run",
]  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no stray ~/.funczero_env
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "hosts").write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    (tmp_path / "bad_hosts").write_text("localhost slots=2\nworker slots=-1\n")
    (tmp_path / "empty_hosts").write_text("localhost slots=0\n")
    (tmp_path / "bad.env").write_text("GOOD=1\nthis line is wrong\n")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "latin1_hosts").write_bytes(b"localhost slots=1\nn\xe9ud slots=1\n")
    (tmp_path / "latin1.env").write_bytes(b"A=1\nB=caf\xe9\n")
    (tmp_path / "huge_hosts").write_text("localhost slots=99999999999999999999\n")
    (tmp_path / "dash_hosts").write_text("localhost slots=1\n-oProxyCommand=x slots=1\n")
    (tmp_path / "nul.env").write_text("A=x\0y\n")
    (tmp_path / "big.env").write_text(f"BIG={'x' * 1_000_000}\n")
    (tmp_path / "binary.pid").write_bytes(b"\xff\xfe not a pid\n")
    return tmp_path


MISUSES = [
    ("", "missing SCRIPT"),
    ("nope.py", "script 'nope.py' not found"),
    ("--num_gpu 2 train.py", "No such option: --num_gpu"),
    ("--num_gpus two train.py", "Invalid value for '--num_gpus'"),
    ("-i localhost:0 -e localhost:1 train.py", "--include and --exclude cannot be combined"),
    ("-i localhost --num_gpus 2 train.py", "cannot be combined with --num_nodes/--num_gpus"),
    ("--module --no_python train.py", "--module and --no_python cannot be combined"),
    ("--launcher mpi train.py", "--launcher 'mpi' is not supported"),
    ("-H hosts -i gpu-9 train.py", "host 'gpu-9' is not in the resource pool"),
    ("-H hosts -e localhost:7 train.py", "host 'localhost' has no slot 7"),
    ("-H bad_hosts train.py", "bad_hosts line 2: 'slots=-1' is negative"),
    ("-H empty_hosts train.py", "no resources left to run on"),
    ("-H missing_hosts train.py", "--hostfile 'missing_hosts' does not exist"),
    ("--env_file bad.env train.py", "bad.env line 2: 'this line is wrong' has no '='"),
    ("--master_port 70000 train.py", "--master_port 70000 is out of range"),
    ("--num_nodes 2 train.py", "--num_nodes 2 needs a hostfile"),
    ("-H hosts --launcher local train.py", "--launcher local runs one node but 2 hosts"),
    ("-H hosts --node_rank 2 train.py", "--node_rank 2 is out of range"),
    ("--node_rank 0 --launcher ssh train.py", "cannot be combined with --launcher ssh"),
    ("--elastic --node_rank 0 train.py", "--node_rank cannot be combined with --elastic"),
    ("--max_restarts 2 train.py", "--max_restarts only applies with --elastic"),
    (
        "--elastic --min_nodes 3 --max_nodes 2 train.py",
        "--min_nodes 3 is larger than --max_nodes 2",
    ),
    (
        "--launcher openmpi --log_dir l train.py",
        "--log_dir is not supported with --launcher openmpi",
    ),
    ("--launcher_args '-p 22' train.py", "--launcher_args only applies to"),
    ("--bind_core_list 0-3 train.py", "--bind_core_list needs --bind_cores_to_rank"),
    ("--bind_cores_to_rank --bind_core_list 3-1 train.py", "range '3-1' is descending"),
    ("--log_dir a_file train.py", "--log_dir 'a_file' is a file"),
    ("--no_python not-a-command-anywhere", "is not an executable file or a command on PATH"),
    # Hostile inputs: one clear line each, never a traceback.
    ("-H latin1_hosts train.py", "hostfile 'latin1_hosts' line 2: byte b'\\xe9' is not UTF-8"),
    ("--env_file latin1.env train.py", "env file 'latin1.env' line 2: byte b'\\xe9' is not UTF-8"),
    ("-H huge_hosts train.py", "'slots=99999999999999999999' is too large"),
    ("-H dash_hosts train.py", "line 2: '-oProxyCommand=x' is not a host name"),
    ("--env_file nul.env train.py", "the value of A contains a NUL character"),
    ("--env_file big.env train.py", "BIG is 1,000,005 bytes, over Linux's limit of 131,072"),
    ("--kill_timeout nan train.py", "--kill_timeout nan is not a number of seconds"),
    ("--kill_timeout inf train.py", "--kill_timeout inf is not a number of seconds"),
    ("--kill_timeout -1 train.py", "--kill_timeout -1.0 is not a number of seconds"),
    ("--num_gpus 99999999 train.py", "--num_gpus 99999999 is out of range"),
    (
        "--bind_cores_to_rank --bind_core_list 0-100000000 train.py",
        "core 100000000 does not exist",
    ),
    (
        "--bind_cores_to_rank --bind_core_list 0-8000 train.py",
        "core(s) ",  # exists in principle, not on this machine
    ),
    ("--save_pid binary.pid train.py", "--save_pid 'binary.pid' exists and does not hold a PID"),
    ("--save_pid . train.py", "--save_pid '.' exists and is not a regular file"),
]


@pytest.mark.parametrize(("cmdline", "fragment"), MISUSES, ids=[c or "no-args" for c, _ in MISUSES])
def test_misuse_prints_one_line_naming_the_problem_and_exits_nonzero(
    workdir: Path, cmdline: str, fragment: str
) -> None:
    result = CliRunner().invoke(app, ["launch", *shlex.split(cmdline)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("funczero launch: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_missing_runner_tool_is_a_one_line_error(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(workdir))  # no pdsh here
    result = CliRunner().invoke(app, ["launch", "-H", "hosts", "--launcher", "pdsh", "train.py"])
    assert result.exit_code == 2
    assert result.stderr.strip().endswith(
        "choose another --launcher (ssh needs only an ssh client)"
    )
    assert "needs 'pdsh' on PATH" in result.stderr


def test_help_lists_every_flag_with_deepspeed_and_torchrun_names() -> None:
    result = CliRunner().invoke(app, ["launch", "--help"])
    assert result.exit_code == 0
    for flag in FLAGS:
        assert flag in result.output, flag


def test_script_arguments_that_look_like_launcher_flags_go_to_the_script(workdir: Path) -> None:
    result = CliRunner().invoke(
        app, ["launch", "--dry_run", "train.py", "--num_gpus", "7", "--dry_run"]
    )
    assert result.exit_code == 0, result.output
    assert "world size 1" in result.output
    assert "--local_rank=0 --num_gpus 7 --dry_run" in result.output


def test_cli_modules_import_without_torch() -> None:
    # funczero/__init__.py (training side) and the other sub-commands may import torch;
    # the launcher's own modules must not (the stub skips the package __init__ only).
    code = (
        f"import runpy, sys; sys.argv = [{str(CLI)!r}]; "
        f"ns = runpy.run_path({str(CLI)!r}, run_name='not_main'); "
        "import funczero.cli.launch, funczero.launch.launcher, funczero.launch.agent; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO)


def test_real_entry_point_runs_a_job(tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text("import os; print('rank', os.environ['RANK'])\n")
    result = subprocess.run(
        [sys.executable, "-m", "funczero.cli.app", "launch", "--master_port", "0", "ok.py"],
        cwd=tmp_path,
        env=launch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "[rank0]: rank 0" in result.stdout


def test_an_explicit_master_port_in_use_is_a_one_line_error_before_starting(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["launch", "--master_port", str(port), "train.py"])
    assert result.exit_code == 2, result.output
    assert f"--master_port {port} is in use on this machine" in result.stderr
    assert "leave --master_port out on a single node" in result.stderr


def test_save_pid_never_overwrites_a_file_that_is_not_a_pid_file(workdir: Path) -> None:
    before = (workdir / "binary.pid").read_bytes()
    result = CliRunner().invoke(app, ["launch", "--save_pid", "binary.pid", "train.py"])
    assert result.exit_code == 2
    assert (workdir / "binary.pid").read_bytes() == before
