"""Resource resolution, rank assignment, env files and planning (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from funczero.launch.envfile import exported_environment, load_env_files, parse_env_text
from funczero.launch.errors import LaunchError
from funczero.launch.options import LaunchOptions
from funczero.launch.plan import make_plan
from funczero.launch.resources import resolve_world
from funczero.launch.spec import (
    Node,
    World,
    decode_node_table,
    encode_node_table,
    worker_environment,
)


@pytest.fixture
def hostfile(tmp_path: Path) -> str:
    path = tmp_path / "hostfile"
    path.write_text("node-a slots=4\nnode-b slots=4\nnode-c slots=2\n")
    return str(path)


def _world(opts: LaunchOptions, environ: dict[str, str] | None = None, gpus: int = 0) -> World:
    opts.script = opts.script or "train.py"
    opts.validate()
    world, _ = resolve_world(opts, environ=environ or {}, local_gpus=gpus)
    return world


def test_no_hostfile_and_no_gpu_runs_num_gpus_cpu_processes_on_localhost() -> None:
    assert _world(LaunchOptions()) == World((Node("localhost", (0,)),), "cpu")
    assert _world(LaunchOptions(num_gpus=3)).nodes[0].slots == (0, 1, 2)


def test_local_gpus_are_the_pool_and_num_gpus_takes_the_first_n() -> None:
    world = _world(LaunchOptions(num_gpus=2), gpus=4)
    assert world == World((Node("localhost", (0, 1)),), "cuda")
    with pytest.raises(LaunchError, match="--num_gpus 5 but host 'localhost' has only 4 slot"):
        _world(LaunchOptions(num_gpus=5), gpus=4)


def test_user_cuda_visible_devices_is_honoured_with_physical_ids() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "2,5"}
    world = _world(LaunchOptions(), environ, gpus=2)
    assert world.nodes[0].slots == (2, 5)
    assert world.nodes[0].visible_devices() == "2,5"
    assert _world(LaunchOptions(include="localhost:5"), environ, gpus=2).nodes[0].slots == (5,)
    with pytest.raises(LaunchError, match="has no slot 0 \\(its slots: 2,5\\)"):
        _world(LaunchOptions(include="localhost:0"), environ, gpus=2)


def test_gpu_uuids_in_cuda_visible_devices_are_kept_by_name() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb,GPU-ccc"}
    world = _world(LaunchOptions(exclude="localhost:1"), environ, gpus=3)
    assert world.nodes[0].visible_devices() == "GPU-aaa,GPU-ccc"


def test_hostfile_filters_and_counts_apply_in_hostfile_order(hostfile: str) -> None:
    assert _world(LaunchOptions(hostfile=hostfile, num_nodes=2)).hosts == ["node-a", "node-b"]
    world = _world(LaunchOptions(hostfile=hostfile, num_gpus=2))
    assert [n.slots for n in world.nodes] == [(0, 1)] * 3
    world = _world(LaunchOptions(hostfile=hostfile, include="node-c@node-a:3"))
    assert [(n.host, n.slots) for n in world.nodes] == [("node-a", (3,)), ("node-c", (0, 1))]


@pytest.mark.parametrize(
    ("opts", "fragment"),
    [
        (LaunchOptions(num_nodes=4), "--num_nodes 4 but hostfile"),
        (LaunchOptions(num_gpus=3), "--num_gpus 3 but host 'node-c' has only 2 slot(s)"),
        (
            LaunchOptions(include="node-a", num_gpus=1),
            "cannot be combined with --num_nodes/--num_gpus",
        ),
        (
            LaunchOptions(exclude="node-a", num_nodes=1),
            "cannot be combined with --num_nodes/--num_gpus",
        ),
        (LaunchOptions(include="node-z"), "host 'node-z' is not in the resource pool"),
        (LaunchOptions(include="node-c:2"), "host 'node-c' has no slot 2"),
    ],
)
def test_impossible_resource_requests_are_errors(
    hostfile: str, opts: LaunchOptions, fragment: str
) -> None:
    opts.hostfile = hostfile
    with pytest.raises(LaunchError) as info:
        _world(opts)
    assert fragment in str(info.value)


def test_job_hostfile_is_the_default_when_present(
    hostfile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("funczero.launch.resources.DEFAULT_HOSTFILE", hostfile)
    assert _world(LaunchOptions()).hosts == ["node-a", "node-b", "node-c"]
    monkeypatch.setattr("funczero.launch.resources.DEFAULT_HOSTFILE", hostfile + ".missing")
    assert _world(LaunchOptions()).hosts == ["localhost"]


def test_hostfile_with_only_zero_slots_means_no_resources(tmp_path: Path) -> None:
    path = tmp_path / "hostfile"
    path.write_text("a slots=0\nb slots=0\n")
    with pytest.raises(LaunchError, match="no resources left to run on"):
        _world(LaunchOptions(hostfile=str(path)))


def test_num_nodes_above_one_without_hostfile_needs_node_rank() -> None:
    with pytest.raises(LaunchError, match="--num_nodes 2 needs a hostfile"):
        _world(LaunchOptions(num_nodes=2))
    world = _world(LaunchOptions(num_nodes=2, num_gpus=2, node_rank=1))
    assert world.hosts == ["node0", "node1"] and world.world_size == 4


def test_global_ranks_are_contiguous_per_node_even_with_unequal_slot_counts() -> None:
    world = World((Node("a", (0, 1, 2)), Node("b", (0, 1))), "cuda")
    env = [worker_environment(world.assignment(1), local, "a", 29500) for local in range(2)]
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in env] == [("3", "0"), ("4", "1")]
    assert env[0]["WORLD_SIZE"] == "5" and env[0]["LOCAL_WORLD_SIZE"] == "2"
    assert env[0]["NODE_RANK"] == "1" and env[0]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_node_assignments_survive_the_node_table_for_remote_nodes() -> None:
    world = World(
        (
            Node("fe80::1", (0, 2)),
            Node("b", (1,), ("GPU-x",)),
            Node("c%h 'q'", (0, 1)),
            Node("d", (0, 1)),
        ),
        "cuda",
    )
    everyone = [world.assignment(i) for i in range(4)]
    table = encode_node_table(everyone)
    assert [decode_node_table(table, node.host) for node in everyone] == everyone
    assert table.count("[0,1]") == 1  # alike neighbours share one group
    assert decode_node_table(encode_node_table(everyone[1:2])) == everyone[1]
    with pytest.raises(ValueError, match="lists no node for host 'zz'"):
        decode_node_table(table, "zz")
    with pytest.raises(ValueError, match="lists 4 nodes for host None"):
        decode_node_table(table)
    with pytest.raises(ValueError, match="malformed node table"):
        decode_node_table('{"groups": 3}', "b")


def test_env_file_allows_comments_blank_lines_export_and_quotes() -> None:
    text = '# comment\n\nexport A=1\nB = "two words"\nC=$HOME `id` ; rm\nD=a=b\n'
    assert parse_env_text(text, "f") == {
        "A": "1",
        "B": "two words",
        "C": "$HOME `id` ; rm",
        "D": "a=b",
    }


def test_env_file_drops_trailing_comments_like_shells_and_dotenv() -> None:
    text = (
        "A=a # comment\nB=a#b\nC='q # kept' # dropped\nD=\"it's\"  # x\nE=  #x\n"
        "F='it's'\nG=\"unterminated # dropped\n"
    )
    assert parse_env_text(text, "f") == {
        "A": "a",
        "B": "a#b",
        "C": "q # kept",
        "D": "it's",
        "E": "#x",
        "F": "it's",
        "G": '"unterminated',
    }


def test_env_file_lines_end_only_at_newlines() -> None:
    # U+2028 inside a value must not start a new line that sets another variable.
    text = "A=x\u2028B=1\nC=y\x0cz\x1cw\r\n"
    assert parse_env_text(text, "f") == {"A": "x\u2028B=1", "C": "y\x0cz\x1cw"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("A=1\nnot an assignment\n", "env file f line 2: 'not an assignment' has no '='"),
        ("1A=1\n", "env file f line 1: '1A' is not a valid variable name"),
        ("A=1\nB=x\0y\n", "env file f line 2: the value of B contains a NUL character"),
        (f"A={'v' * 131_070}\n", "env file f line 1: A is 131,073 bytes, over Linux's limit"),
    ],
)
def test_bad_env_file_line_is_an_error_naming_the_line(text: str, fragment: str) -> None:
    with pytest.raises(LaunchError) as info:
        parse_env_text(text, "f")
    assert fragment in str(info.value)


def test_env_file_in_working_directory_overrides_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    (home / ".funczero_env").write_text("A=home\nB=home\n")
    (cwd / ".funczero_env").write_text("B=cwd\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert load_env_files() == {"A": "home", "B": "cwd"}
    explicit = tmp_path / "explicit.env"
    explicit.write_text("C=3\n")
    assert load_env_files(explicit) == {"C": "3"}
    with pytest.raises(LaunchError, match="--env_file .* does not exist"):
        load_env_files(tmp_path / "missing.env")


def test_nccl_python_ucx_variables_and_env_file_are_exported() -> None:
    environ = {"NCCL_DEBUG": "INFO", "PYTHONPATH": "/x", "UCX_TLS": "tcp", "HOME": "/root"}
    exported = exported_environment(environ, {"NCCL_DEBUG": "WARN", "EXTRA": "1"})
    assert exported == {"NCCL_DEBUG": "WARN", "PYTHONPATH": "/x", "UCX_TLS": "tcp", "EXTRA": "1"}


def test_plan_picks_loopback_for_one_node_and_first_host_for_several(
    hostfile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    local = make_plan(LaunchOptions(script="train.py", master_port=0), environ={}, local_gpus=0)
    assert (local.launcher, local.master_addr) == ("local", "127.0.0.1")
    assert local.master_port > 0
    multi = make_plan(LaunchOptions(script="train.py", hostfile=hostfile), environ={}, local_gpus=0)
    assert (multi.launcher, multi.master_addr, multi.master_port) == ("ssh", "node-a", 29500)
    one = make_plan(
        LaunchOptions(script="train.py", hostfile=hostfile, include="node-b"), environ={}
    )
    assert (one.launcher, one.master_addr) == ("local", "127.0.0.1")  # no ssh probe for one host
    with pytest.raises(LaunchError, match="--master_port 0 picks a free port"):
        make_plan(LaunchOptions(script="train.py", hostfile=hostfile, master_port=0), environ={})
