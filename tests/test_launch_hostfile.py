"""Hostfile parsing and DeepSpeed's --include/--exclude grammar (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from funczero.launch.errors import LaunchError
from funczero.launch.hostfile import apply_filters, parse_hostfile, parse_hostfile_text

POOL = {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0, 1]}


def test_hostfile_keeps_file_order_and_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "hostfile"
    path.write_text(
        "# cluster A\n\nworker-1 slots=8\n   # indented comment\n"
        "worker-0 slots=4  # trailing comment\n"
        "worker-2 slots=0\n"
    )
    assert list(parse_hostfile(path).items()) == [("worker-1", 8), ("worker-0", 4), ("worker-2", 0)]


def test_hostfile_accepts_open_mpi_max_slots_in_either_order() -> None:
    text = "a slots=4 max_slots=8\nb max_slots=2 slots=2  # comment\n"
    assert parse_hostfile_text(text) == {"a": 4, "b": 2}


def test_hostfile_lines_end_only_at_newlines() -> None:
    # U+2028 and form feeds are not line ends (str.splitlines() would split there).
    with pytest.raises(LaunchError, match="line 1"):
        parse_hostfile_text("a slots=1\u2028b slots=2\n")
    assert parse_hostfile_text("a slots=1\r\nb slots=2\r\n") == {"a": 1, "b": 2}


def test_hostfile_that_is_not_utf8_or_not_a_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(b"a slots=1\n\xffb slots=1\n")
    with pytest.raises(LaunchError, match=r"line 2: byte b'\\xff' is not UTF-8"):
        parse_hostfile(path)
    with pytest.raises(LaunchError, match="is not a regular file"):
        parse_hostfile(tmp_path)


def test_hostfile_accepts_ipv6_hosts_bare_and_bracketed() -> None:
    hosts = parse_hostfile_text("fe80::1 slots=2\n[2001:db8::7] slots=4\n::1 slots=1\n")
    assert hosts == {"fe80::1": 2, "2001:db8::7": 4, "::1": 1}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a slots=2\nb slots=-1\n", "line 2: 'slots=-1' is negative; slots must be >= 0"),
        ("a slots=4 max_slots=2\n", "line 1: max_slots=2 is below slots=4"),
        ("a slots=4 extra\n", "line 1: 'extra' is not a slot count"),
        ("a slots=1 slots=2\n", "line 1: slots= is given twice"),
        ("a max_slots=8\n", "line 1: 'a' has no slot count"),
        ("a slots=4abc\n", "line 1: 'slots=4abc' is not a slot count"),
        ("a slots=\u0663\n", "line 1: 'slots=\u0663' is not a slot count"),  # Arabic-Indic 3
        ("a slots=4097\n", "line 1: 'slots=4097' is too large"),
        ("-F/tmp/x slots=1\n", "line 1: '-F/tmp/x' is not a host name"),
        ("a,b slots=1\n", "line 1: 'a,b' is not a host name"),
        ("a\n", "line 1: 'a' has no slot count"),
        ("a slots=1\nb slots=2\na slots=3\n", "line 3: host 'a' is already listed on line 1"),
        ("a count=4\n", "line 1: 'count=4' is not a slot count"),
    ],
)
def test_malformed_hostfile_line_is_an_error_naming_the_line(text: str, fragment: str) -> None:
    with pytest.raises(LaunchError, match="hostfile") as info:
        parse_hostfile_text(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_hostfile_is_an_error(text: str) -> None:
    with pytest.raises(LaunchError, match="has no 'HOST slots=N' entries"):
        parse_hostfile_text(text)


def test_missing_hostfile_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="hostfile '.*nope' does not exist"):
        parse_hostfile(tmp_path / "nope")


def test_include_merges_and_deduplicates_slots_in_hostfile_order() -> None:
    result = apply_filters(POOL, include="worker-1:3,1@worker-0:2@worker-1:1")
    assert list(result.items()) == [("worker-0", [2]), ("worker-1", [1, 3])]


def test_include_whole_host_keeps_all_its_slots_and_wins_over_a_slot_list() -> None:
    assert apply_filters(POOL, include="worker-2@worker-2:1") == {"worker-2": [0, 1]}


def test_exclude_drops_whole_hosts_and_single_slots() -> None:
    result = apply_filters(POOL, exclude="worker-1@worker-0:0,3")
    assert list(result.items()) == [("worker-0", [1, 2]), ("worker-2", [0, 1])]


def test_exclude_all_slots_of_a_host_removes_the_host() -> None:
    assert "worker-2" not in apply_filters(POOL, exclude="worker-2:0,1")


def test_no_filter_returns_the_pool_unchanged() -> None:
    assert apply_filters(POOL) == POOL


@pytest.mark.parametrize(
    ("include", "exclude", "fragment"),
    [
        ("nohost", "", "--include: host 'nohost' is not in the resource pool"),
        ("", "nohost:0", "--exclude: host 'nohost' is not in the resource pool"),
        ("worker-2:5", "", "host 'worker-2' has no slot 5 (its slots: 0,1)"),
        ("", "worker-0:4", "host 'worker-0' has no slot 4"),
        ("worker-0:a", "", "slot 'a' is not a number"),
        ("worker-0:", "", "slot '' is not a number"),
        ("worker-0:1:2", "", "host 'worker-0:1' is not in the resource pool"),
        ("worker-0@@worker-1", "", "has an empty node spec"),
        ("worker-0:0", "worker-1", "cannot be combined"),
    ],
)
def test_bad_filter_is_an_error_naming_the_problem(
    include: str, exclude: str, fragment: str
) -> None:
    with pytest.raises(LaunchError) as info:
        apply_filters(POOL, include=include, exclude=exclude)
    assert fragment in str(info.value)


def test_ipv6_hosts_work_in_filters_bare_or_bracketed() -> None:
    pool = {"fe80::1": [0, 1, 2], "fe80::2": [0, 1]}
    assert apply_filters(pool, include="fe80::2") == {"fe80::2": [0, 1]}
    assert apply_filters(pool, include="[fe80::1]:0,2") == {"fe80::1": [0, 2]}
    assert apply_filters(pool, include="fe80::1:1") == {"fe80::1": [1]}
    assert apply_filters(pool, exclude="[fe80::2]") == {"fe80::1": [0, 1, 2]}
