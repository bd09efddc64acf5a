"""Hostfiles and DeepSpeed's ``--include`` / ``--exclude`` grammar.

A hostfile lists one host per line as ``HOST slots=N``; ``#`` starts a comment.
File order is node order, and node order is global-rank order.

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

__all__ = ["Pool", "apply_filters", "parse_filter", "parse_hostfile", "parse_hostfile_text"]

#: Ordered ``host -> slot ids``; dict order is node order.
Pool = dict[str, list[int]]

_SLOTS = re.compile(r"slots=(-?\d+)")


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
        LaunchError: On a malformed line, a negative or non-numeric slot count,
            a duplicate host, or a file without entries. The message names the line.
    """
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        content = raw.split("#", 1)[0].strip()
        if not content:
            continue
        where = f"{source} line {number}"
        tokens = content.split()
        if len(tokens) == 1:
            raise LaunchError(
                f"{where}: {content!r} has no slot count; write 'HOST slots=N', "
                f"e.g. '{tokens[0]} slots=8'"
            )
        host, slots_text, *extra = tokens
        if extra:
            raise LaunchError(
                f"{where}: unexpected {' '.join(extra)!r} after {slots_text!r}; only a "
                "'# comment' may follow 'HOST slots=N'"
            )
        match = _SLOTS.fullmatch(slots_text)
        if match is None:
            raise LaunchError(
                f"{where}: {slots_text!r} is not a slot count; write 'slots=N' with N a "
                "whole number >= 0"
            )
        slots = int(match.group(1))
        if slots < 0:
            raise LaunchError(f"{where}: {slots_text!r} is negative; slots must be >= 0")
        host = _strip_brackets(host)
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


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """Read and parse a hostfile; see :func:`parse_hostfile_text`.

    Raises:
        LaunchError: If the file cannot be read or is malformed.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise LaunchError(
            f"cannot read hostfile {str(path)!r}: {exc.strerror}; pass an existing file "
            "with --hostfile"
        ) from None
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
