"""``funczero config check``: validate a DeepSpeed config and show how funczero resolves it.

Prints every problem (exit 1), or a table of the resolved keys (exit 0): the value, whether it
was set or is a default (or was computed, as the batch sizes are), DeepSpeed's default for the
same key, and where funczero's behaviour differs (keys it ignores, keys it accepts only at their
default, defaults that differ). ``--all`` lists every key, not only those given or computed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["ConfigRow", "check_config", "config_app"]

ConfigRow = dict[str, Any]
"""``{"key", "value", "origin", "deepspeed", "differs"}`` (origin: set, default, computed)."""

_COMPUTED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        v = list(v)
    return json.dumps(v) if not isinstance(v, str) else v


def _monitor_values(settings: Any) -> dict[str, Any]:
    from funczero.monitors.settings import BLOCKS

    out = {f"{b}.{f.name}": getattr(getattr(settings, b), f.name)
           for b in BLOCKS for f in dataclasses.fields(BLOCKS[b])}
    return out


def check_config(
    source: str | os.PathLike[str] | Mapping[str, Any], *, world_size: int | None = None,
    show_all: bool = False,
) -> tuple[list[ConfigRow], list[str], list[str]]:
    """Validate ``source`` and describe the resolved config.

    Returns:
        ``(rows, problems, warnings)``; ``rows`` is empty when there are problems.

    Example:
        >>> rows, problems, _ = check_config({"train_batch_size": 8,
        ...                                   "csv_monitor": {"enabled": True}}, world_size=2)
        >>> problems, [(r["key"], r["value"], r["origin"]) for r in rows][:2]
        ([], [('train_batch_size', '8', 'set'), ('train_micro_batch_size_per_gpu', '4', 'computed')])
    """
    from funczero.config import KEYS, Config, ConfigError
    from funczero.config.source import read_source
    from funczero.monitors.settings import BLOCKS, MonitorSettings, MonitorSettingsError

    problems: list[str] = []
    monitors = cfg = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            raw = read_source(source)
        except ConfigError as e:
            return [], list(e.problems), [str(w.message) for w in caught]
        wired = "monitors" in {f.name for f in dataclasses.fields(Config)}  # parses them itself
        try:
            wcb = raw.get("wall_clock_breakdown")
            if not wired:
                monitors = MonitorSettings.from_deepspeed(
                    {**{k: raw[k] for k in BLOCKS if k in raw},
                     **({"wall_clock_breakdown": wcb} if isinstance(wcb, bool) else {})})
        except MonitorSettingsError as e:
            problems += str(e).splitlines()
        try:
            given = raw if wired else {k: v for k, v in raw.items() if k not in BLOCKS}
            cfg = Config.load(given, world_size=world_size)
        except ConfigError as e:
            problems[:0] = e.problems
    warned = [str(w.message) for w in caught]
    if problems or cfg is None:
        return [], problems, warned
    resolved = _flatten(cfg.to_dict())
    resolved.update(_monitor_values(getattr(cfg, "monitors", None) or monitors))
    given_paths = set(_flatten(raw))
    rows: list[ConfigRow] = []
    for path, value in resolved.items():
        key = KEYS.get(path) or KEYS.get(path.replace("bfloat16", "bf16"))
        origin = "set" if path in given_paths else (
            "computed" if path in _COMPUTED else "default")
        if not show_all and origin == "default":
            continue
        rows.append(_row(path, value, origin, key))
    return rows, [], warned


def _row(path: str, value: Any, origin: str, key: Any) -> ConfigRow:
    from funczero.config import Status

    deepspeed, differs = "same key", ""
    if key is not None:
        deepspeed = f"default {_show(key.default)}" if key.ds is None else f"default {key.ds}"
        if key.status is Status.IGNORED:
            differs = f"no effect: {key.doc}"
        elif key.status is Status.DEFAULT_ONLY:
            differs = f"only the default: {key.doc}"
        elif key.ds is not None:
            differs = "funczero's default differs"
    elif path.startswith("optimizer.params."):
        deepspeed = "same key (optimizer.params)"
    elif path.split(".")[0] in ("tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler"):
        deepspeed = "same key"
        if path.startswith("flops_profiler."):
            differs = "FLOPs from a per-token count, not module hooks (docs/monitoring.md)"
    return {"key": path, "value": _show(value), "origin": origin, "deepspeed": deepspeed,
            "differs": differs}


config_app = typer.Typer(
    name="config",
    help="Check DeepSpeed/funczero configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@config_app.command("check")
def check(
    path: Annotated[Path, typer.Argument(metavar="CONFIG", help="A DeepSpeed JSON config file.")],
    world_size: Annotated[
        int | None,
        typer.Option("--world-size", "-w", min=1,
                     help="Data-parallel size to resolve batch sizes for (default $WORLD_SIZE or 1)."),
    ] = None,
    show_all: Annotated[bool, typer.Option("--all", help="List every key, defaults too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Validate CONFIG; print the resolved keys (exit 0) or every problem (exit 1)."""
    rows, problems, warned = check_config(path, world_size=world_size, show_all=show_all)
    if as_json:
        sys.stdout.write(json.dumps({"ok": not problems, "problems": problems,
                                     "warnings": warned, "keys": rows}, indent=2) + "\n")
        raise typer.Exit(1 if problems else 0)
    for w in warned:
        typer.echo(f"warning: {w}", err=True)
    if problems:
        typer.echo(f"{path}: {len(problems)} problem(s):", err=True)
        for p in problems:
            typer.echo(f"  - {p}", err=True)
        raise typer.Exit(1)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{path}: valid", title_justify="left")
    for col in ("key", "value", "origin", "DeepSpeed", "where funczero differs"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["key"], r["value"], r["origin"], r["deepspeed"], r["differs"])
    Console(markup=False, highlight=False, width=max(Console().width, 140)).print(table)
