"""Hostfiles and DeepSpeed's ``--include`` / ``--exclude`` grammar.

A hostfile lists one host per line as ``HOST slots=N`` (Open MPI's ``max_slots=M``
may follow and is ignored); ``#`` starts a comment. File order is node order, and
node order is global-rank order.

A filter is ``NODE_SPEC[@NODE_SPEC...]`` with ``NODE_SPEC = HOST[:SLOT[,SLOT...]]``.
IPv6 hosts are written bare when the text is unambiguous (``fe80::1`` names a host
in the pool) or in brackets (``[fe80::1]:0,1``).

Examples:
    >>> pool = {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    >>> apply_filters(pool, include="b:1@a:2,0@b:1")
    {'a': [0, 2], 'b': [1]}
    >>> apply_filters(pool, exclude="a@b:0")
    {'b': [1, 2, 3]}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from funczero.launch.errors import LaunchError
from funczero.launch.options import MAX_SLOTS_PER_NODE

__all__ = [
    "Pool",
    "apply_filters",
    "parse_filter",
    "parse_hostfile",
    "parse_hostfile_text",
    "read_text_file",
]

#: Ordered ``host -> slot ids``; dict order is node order.
Pool = dict[str, list[int]]

_COUNT = re.compile(r"(max_slots|slots)=(-?[0-9]+)")
#: Larger files are not hostfiles or env files (and /dev/zero must not fill memory).
_MAX_FILE_BYTES = 16 * 1024 * 1024


def read_text_file(path: str | Path, what: str) -> str:
    """Read a small UTF-8 text file (hostfile, env file) with one-line errors.

    Args:
        path: The file.
        what: How messages name it, e.g. ``"hostfile"``.

    Raises:
        LaunchError: If it is missing, not a regular file, over 16 MiB, unreadable,
            or not UTF-8 (naming the line of the first bad byte).
    """
    path = Path(path)
    if not path.is_file():
        state = "is not a regular file" if path.exists() else "does not exist"
        raise LaunchError(f"{what} {str(path)!r} {state}; pass an existing text file")
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise LaunchError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise LaunchError(
            f"{what} {str(path)!r} is larger than {_MAX_FILE_BYTES // 2**20} MiB; is it the "
            "right file?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LaunchError(
            f"{what} {str(path)!r} line {line}: byte {data[exc.start : exc.start + 1]!r} is not "
            "UTF-8 text; save the file as UTF-8"
        ) from None


def _text_lines(text: str) -> list[str]:
    # Only "\n" ends a line (with an optional "\r"): str.splitlines() would also split at
    # U+2028, form feeds and other characters that may appear inside a value.
    return [line.removesuffix("\r") for line in text.split("\n")]


def _strip_brackets(host: str) -> str:
    # `[fe80::1]` and `fe80::1` name the same host; keep the bare form internally.
    if host.startswith("[") and host.endswith("]") and len(host) > 2:
        return host[1:-1]
    return host


def parse_hostfile_text(text: str, source: str = "hostfile") -> dict[str, int]:
    """Parse hostfile text into ordered ``host -> slot count``.

    Args:
        text: The file's content.
        source: Name used in error messages, usually ``"hostfile <path>"``.

    Returns:
        Hosts in file order with their slot counts (``slots=0`` is kept).

    Raises:
        LaunchError: On a malformed line, a negative, huge or non-numeric slot count,
            a host name that could be taken for an option, a duplicate host, or a
            file without entries. The message names the line.

    Example:
        >>> parse_hostfile_text("gpu-1 slots=8  # rack A\\ngpu-2 slots=4 max_slots=8\\n")
        {'gpu-1': 8, 'gpu-2': 4}
    """
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(_text_lines(text), start=1):
        content = raw.split("#", 1)[0].strip()
        if not content:
            continue
        where = f"{source} line {number}"
        host, *tokens = content.split()
        counts = _slot_counts(tokens, where, host)
        host = _strip_brackets(host)
        if host.startswith("-") or "," in host:
            raise LaunchError(
                f"{where}: {host!r} is not a host name (a leading '-' would be read as an "
                "ssh option, a ',' splits host lists); fix the name"
            )
        slots = counts["slots"]
        if host in hosts:
            raise LaunchError(
                f"{where}: host {host!r} is already listed on line {first_line[host]}; "
                "list each host once with its total slot count"
            )
        hosts[host] = slots
        first_line[host] = number
    if not hosts:
        raise LaunchError(
            f"{source} has no 'HOST slots=N' entries; add one line per host, "
            "e.g. 'worker-1 slots=8'"
        )
    return hosts


def _slot_counts(tokens: list[str], where: str, host: str) -> dict[str, int]:
    """Parse ``slots=N [max_slots=M]`` (any order) of one hostfile line."""
    counts: dict[str, int] = {}
    for token in tokens:
        match = _COUNT.fullmatch(token)
        if match is None:
            raise LaunchError(
                f"{where}: {token!r} is not a slot count; write 'HOST slots=N' with N a whole "
                "number >= 0 (only 'max_slots=M' or a '# comment' may follow)"
            )
        key, value = match.group(1), int(match.group(2))
        if key in counts:
            raise LaunchError(f"{where}: {key}= is given twice; give it once")
        if value < 0:
            raise LaunchError(f"{where}: {token!r} is negative; {key} must be >= 0")
        if value > MAX_SLOTS_PER_NODE:
            raise LaunchError(
                f"{where}: {token!r} is too large; a host runs at most {MAX_SLOTS_PER_NODE} workers"
            )
        counts[key] = value
    if "slots" not in counts:
        raise LaunchError(
            f"{where}: {host!r} has no slot count; write 'HOST slots=N', e.g. '{host} slots=8'"
        )
    if counts.get("max_slots", counts["slots"]) < counts["slots"]:
        raise LaunchError(
            f"{where}: max_slots={counts['max_slots']} is below slots={counts['slots']}; "
            "max_slots must be >= slots"
        )
    return counts


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """Read and parse a hostfile; see :func:`parse_hostfile_text`.

    Raises:
        LaunchError: If the file cannot be read, is not UTF-8, or is malformed.
    """
    text = read_text_file(path, "hostfile")
    return parse_hostfile_text(text, source=f"hostfile {path}")


def _split_spec(spec: str, pool: Mapping[str, list[int]], flag: str) -> tuple[str, str | None]:
    """Split one ``HOST[:SLOTS]`` spec into host and slot text (None = whole host)."""
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise LaunchError(f"{flag} {spec!r}: missing ']' after the bracketed host")
        host, rest = spec[1:close], spec[close + 1 :]
        if rest and not rest.startswith(":"):
            raise LaunchError(f"{flag} {spec!r}: expected ':SLOT[,SLOT...]' after ']'")
        return host, (rest[1:] if rest else None)
    # A bare IPv6 address contains ':'; it is a whole host when it names one exactly.
    if spec in pool or ":" not in spec:
        return spec, None
    host, slots = spec.rsplit(":", 1)
    return host, slots


def parse_filter(text: str, pool: Mapping[str, list[int]], flag: str) -> dict[str, set[int] | None]:
    """Parse ``--include``/``--exclude`` text against a pool.

    Specs naming the same host are merged; a whole-host spec wins over slot lists.

    Args:
        text: The filter, e.g. ``"a:0,1@b"``.
        pool: The available hosts and slots, for validation.
        flag: ``"--include"`` or ``"--exclude"``, used in messages.

    Returns:
        ``host -> set of slots``, or ``host -> None`` for the whole host.

    Raises:
        LaunchError: On empty specs, non-numeric slots, unknown hosts, or slots
            that the host does not have.
    """
    selected: dict[str, set[int] | None] = {}
    for spec in text.split("@"):
        spec = spec.strip()
        if not spec:
            raise LaunchError(
                f"{flag} {text!r} has an empty node spec; use HOST[:SLOT[,SLOT...]] "
                "joined by '@', e.g. 'worker-1:0,1@worker-2'"
            )
        host, slots_text = _split_spec(spec, pool, flag)
        if host not in pool:
            known = ", ".join(pool) or "none"
            raise LaunchError(
                f"{flag}: host {host!r} is not in the resource pool (hosts: {known}); "
                "check the spelling or the hostfile"
            )
        if slots_text is None:
            selected[host] = None
            continue
        slots: set[int] = set()
        for item in slots_text.split(","):
            item = item.strip()
            if not item.isdigit():
                raise LaunchError(
                    f"{flag} {spec!r}: slot {item!r} is not a number; expected "
                    "HOST:SLOT[,SLOT...] with slot ids >= 0"
                )
            slot = int(item)
            if slot not in pool[host]:
                have = ",".join(map(str, pool[host])) or "none"
                raise LaunchError(
                    f"{flag} {spec!r}: host {host!r} has no slot {slot} (its slots: {have})"
                )
            slots.add(slot)
        if host in selected and selected[host] is None:
            continue  # the whole host is already selected
        selected[host] = (selected.get(host) or set()) | slots
    return selected


def _keeps(selection: set[int] | None, slot: int) -> bool:
    return selection is None or slot in selection


def apply_filters(pool: Mapping[str, list[int]], include: str = "", exclude: str = "") -> Pool:
    """Apply DeepSpeed's include/exclude semantics to a pool.

    Include keeps only the listed hosts (a bare host keeps all its slots); exclude
    removes a whole host or some of its slots. Hosts left without slots are dropped.
    Hosts and slots stay in pool order, whatever order the filter lists them in.

    Args:
        pool: Ordered ``host -> slot ids``.
        include: Include filter, or ``""``.
        exclude: Exclude filter, or ``""``.

    Returns:
        The filtered pool, as a new dict.

    Raises:
        LaunchError: If both filters are given or either is malformed.
    """
    if include and exclude:
        raise LaunchError(
            "--include and --exclude cannot be combined; express the selection with one of them"
        )
    if include:
        chosen = parse_filter(include, pool, "--include")
        result = {
            host: [s for s in slots if _keeps(chosen[host], s)]
            for host, slots in pool.items()
            if host in chosen
        }
    elif exclude:
        dropped = parse_filter(exclude, pool, "--exclude")
        result = {
            host: [s for s in slots if s not in (dropped.get(host) or set())]
            for host, slots in pool.items()
            if not (host in dropped and dropped[host] is None)
        }
    else:
        result = {host: list(slots) for host, slots in pool.items()}
    return {host: slots for host, slots in result.items() if slots}
