"""``funczero ckpt``: inspect, verify, reshard, consolidate and diff checkpoints.

Every command takes a checkpoint root (the directory with ``latest``) or a tag directory,
prints a rich summary, or one JSON object with ``--json``. Text taken from a checkpoint (tensor
paths, the optimizer name...) is printed with control characters escaped, so a hostile index
cannot send escape sequences to the terminal. :mod:`funczero.checkpoint` (and torch) is
imported only when a command runs, so ``funczero --help`` stays fast.

Exit codes (see :data:`EXIT_CODES`): 0 success; 1 a negative answer (``verify`` found damage,
``diff`` found differences); 2 the command could not run (bad arguments, a missing checkpoint,
one too damaged to read, an I/O error); 3 funczero crashed (a bug: the traceback is printed);
130 interrupted (Ctrl+C).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

try:  # typer >= 0.20 vendors click as typer._click; older releases use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import UsageError  # type: ignore[no-redef]

__all__ = ["EXIT_CODES", "CkptCommand", "ckpt_app"]

EXIT_OK, EXIT_NEGATIVE, EXIT_ERROR, EXIT_CRASH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    EXIT_OK: "success (verify: sound; diff: no differences)",
    EXIT_NEGATIVE: "a negative answer: verify found damage, diff found differences",
    EXIT_ERROR: "the command could not run: bad arguments, missing or unreadable checkpoint, "
    "existing output, I/O error (the message names it)",
    EXIT_CRASH: "funczero crashed: a bug, reported with its traceback",
    EXIT_INTERRUPTED: "interrupted (Ctrl+C)",
}
"""Exit code -> meaning, for every ``funczero ckpt`` command."""


class CkptCommand(TyperCommand):
    """A command whose usage errors are one line (``funczero ckpt X: error: ...``, exit 2)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            typer.echo(
                f"funczero ckpt {self.name}: error: {exc.format_message()} "
                f"(see 'funczero ckpt {self.name} --help')",
                err=True,
            )
            ctx.exit(2)


ckpt_app = typer.Typer(
    name="ckpt",
    help="Inspect, verify, reshard, consolidate and diff funczero checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DirArg = Annotated[
    Path,
    typer.Argument(metavar="DIR", help="Checkpoint root (holding 'latest') or a tag directory."),
]
TagOpt = Annotated[str | None, typer.Option("--tag", "-t", help="Tag to use (default: 'latest').")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")]


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    # markup off: tensor paths and file names are printed verbatim, brackets included
    return Console(stderr=stderr, markup=False, highlight=False, soft_wrap=True)


def _emit_json(obj: Any) -> None:
    # ensure_ascii (the default) writes control characters as \u escapes: safe in a terminal
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _safe(value: object) -> str:
    r"""``value`` as text with control and other non-printable characters escaped (``\x1b``).

    Example:
        >>> _safe("w\x1b[2J")
        'w\\x1b[2J'
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in text)


def _fail(command: str, as_json: bool, e: BaseException, code: int, what: str) -> None:
    if as_json:
        _emit_json({"ok": False, "error": str(e), "type": type(e).__name__, "exit_code": code})
    else:
        _console(stderr=True).print(f"funczero ckpt {command}: {what}: {_safe(e)}", style="red")
    raise typer.Exit(code)


@contextmanager
def _errors(command: str, as_json: bool) -> Iterator[None]:
    """Turn failures into one clear message and an exit code that says which kind it was."""
    from funczero.checkpoint import CheckpointError

    try:
        yield
    except (CheckpointError, ValueError, OSError) as e:
        _fail(command, as_json, e, EXIT_ERROR, "error")
    except KeyboardInterrupt:
        typer.echo(f"funczero ckpt {command}: interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:  # noqa: BLE001 - anything else is a bug: say so, with the traceback
        traceback.print_exc(file=sys.stderr)
        _fail(
            command,
            as_json,
            e,
            EXIT_CRASH,
            "internal error (a bug in funczero; please report it with the traceback above)",
        )


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _table(
    title: str,
    columns: list[str],
    rows: list[list[str]],
    justify: Callable[[str], str] | None = None,
) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify=justify(c) if justify else "left")  # type: ignore[arg-type]
    for r in rows:
        table.add_row(*(_safe(cell) for cell in r))
    return table


@ckpt_app.command("list", cls=CkptCommand)
def list_cmd(directory: DirArg, as_json: JsonOpt = False) -> None:
    """List the committed checkpoints under DIR, oldest first, and which one 'latest' names."""
    with _errors("list", as_json):
        from funczero.checkpoint import CheckpointNotFoundError, latest_tag, list_tags

        if not directory.is_dir():
            raise CheckpointNotFoundError(f"checkpoint directory {directory} does not exist")
        tags, latest = list_tags(directory), latest_tag(directory)
    if as_json:
        _emit_json({"ok": True, "tags": tags, "latest": latest})
        return
    con = _console()
    for t in tags:
        con.print(f"{t}{'  <- latest' if t == latest else ''}")
    if not tags:
        con.print(_safe(f"no checkpoints in {directory}"))


@ckpt_app.command("inspect", cls=CkptCommand)
def inspect_cmd(
    directory: DirArg,
    tag: TagOpt = None,
    tensors: Annotated[
        bool,
        typer.Option("--tensors", help="List every tensor with shape, dtype and shard layout."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show step, world size, stage, precision, optimizer, parameter count, bytes and files."""
    with _errors("inspect", as_json):
        from funczero.checkpoint import inspect

        s = inspect(directory, tag)
    if as_json:
        _emit_json({"ok": True, **s.to_json(tensors=tensors)})
        return
    con = _console()
    con.print(_safe(f"checkpoint {s.tag_dir}"), style="bold")
    for k, v in [
        ("tag", s.tag),
        ("step", s.step),
        ("world size", s.world_size),
        ("ZeRO stage", s.stage),
        ("precision", s.precision),
        ("optimizer", s.optimizer),
        ("parameters", f"{s.param_count:,} ({s.trainable_count:,} trainable)"),
        *([("sharded", f"{s.sharded_params} parameter tensors sharded at rest"
            + ("  (none: all below stage3_param_persistence_threshold)" if not s.sharded_params else ""))]
          if s.stage == 3 else []),
        ("created", s.created),
        ("versions", ", ".join(f"{k} {v}" for k, v in s.versions.items())),
        ("client state", ", ".join(s.client_state_keys) or "-"),
    ]:
        con.print(_safe(f"  {k:<13} {v}"))
    groups = [[g, _bytes(n)] for g, n in s.bytes_by_group.items() if n]
    groups.append(["total", _bytes(sum(s.bytes_by_group.values()))])
    con.print(
        _table(
            "bytes by group",
            ["group", "bytes"],
            groups,
            lambda c: "right" if c == "bytes" else "left",
        )
    )
    con.print(
        _table(
            "files",
            ["file", "rank", "bytes", "sha256"],
            [[f["name"], str(f["rank"]), _bytes(f["bytes"]), f["sha256"][:16]] for f in s.files],
        )
    )
    if tensors:
        rows = []
        for t in s.tensors:
            if t["alias_of"]:
                where = f"alias of {t['alias_of']}"
            else:
                where = ", ".join(
                    f"r{c['rank']}[{c['start']}:{c['stop']}]" for c in t["chunks"][:4]
                )
                if len(t["chunks"]) > 4:
                    where += f", ... ({len(t['chunks'])} chunks)"
            rows.append([t["path"], str(tuple(t["shape"])), t["dtype"], t["layout"], where])
        con.print(_table("tensors", ["path", "shape", "dtype", "layout", "stored as"], rows))


@ckpt_app.command("verify", cls=CkptCommand)
def verify_cmd(directory: DirArg, tag: TagOpt = None, as_json: JsonOpt = False) -> None:
    """Check index.json, every file and every checksum; exit 1 naming each bad file or tensor."""
    with _errors("verify", as_json):
        from funczero.checkpoint import verify

        report = verify(directory, tag)
    if as_json:
        _emit_json(report.to_json())
    else:
        con = _console()
        if report.ok:
            con.print(
                _safe(
                    f"OK {report.tag_dir}: {report.files_checked} files, "
                    f"{_bytes(report.bytes_checked)} checked"
                ),
                style="green",
            )
        else:
            con.print(
                _safe(f"DAMAGED {report.tag_dir}: {len(report.problems)} problems"),
                style="bold red",
            )
            for p in report.problems:
                con.print(_safe(f"  {p.where}: {p.message}"))
        for note in report.notes:
            con.print(_safe(f"  note: {note}"), style="yellow")
    if not report.ok:
        raise typer.Exit(EXIT_NEGATIVE)


@ckpt_app.command("reshard", cls=CkptCommand)
def reshard_cmd(
    directory: DirArg,
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output checkpoint root (OUT/<tag> is written).")
    ],
    world_size: Annotated[
        int, typer.Option("--world-size", "-w", min=1, help="New number of ranks.")
    ],
    stage: Annotated[
        int | None,
        typer.Option("--stage", "-s", min=0, max=3, help="New ZeRO stage (default: unchanged)."),
    ] = None,
    tag: TagOpt = None,
    out_tag: Annotated[
        str | None, typer.Option("--out-tag", help="Tag of the output (default: the source tag).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite a checkpoint for another world size (and stage), streaming, offline."""
    with _errors("reshard", as_json):
        from funczero.checkpoint import reshard

        path = reshard(directory, out, world_size=world_size, stage=stage, tag=tag, out_tag=out_tag)
    if as_json:
        _emit_json({"ok": True, "checkpoint": str(path), "world_size": world_size, "stage": stage})
    else:
        _console().print(
            _safe(
                f"wrote {path} (world size {world_size}"
                f"{'' if stage is None else f', stage {stage}'})"
            )
        )


def _report_written(files: list[Path], as_json: bool) -> None:
    """List the files a command wrote (JSON, or one line each with its size)."""
    if as_json:
        _emit_json({"ok": True, "files": [str(f) for f in files]})
        return
    con = _console()
    for f in files:
        con.print(_safe(f"wrote {f} ({_bytes(f.stat().st_size)})"))


@ckpt_app.command("consolidate", cls=CkptCommand)
def consolidate_cmd(
    directory: DirArg,
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output directory for model.safetensors.")
    ],
    dtype: Annotated[
        str, typer.Option("--dtype", help="fp32, bf16 or fp16 for floating-point weights.")
    ] = "fp32",
    max_shard_size: Annotated[
        str | None,
        typer.Option("--max-shard-size", help="Split into files of at most this size, e.g. 5GB."),
    ] = None,
    tag: TagOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing output files.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the model weights as Hugging Face-style safetensors keyed by module FQN."""
    with _errors("consolidate", as_json):
        from funczero.checkpoint import consolidate

        files = consolidate(
            directory, out, tag=tag, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite
        )
    _report_written(files, as_json)


@ckpt_app.command("export", cls=CkptCommand)
def export_cmd(
    directory: DirArg,
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output model directory (from_pretrained opens it).")
    ],
    config_json: Annotated[
        Path,
        typer.Option("--config-json", help="The model's config.json (or its directory) to copy."),
    ],
    dtype: Annotated[
        str, typer.Option("--dtype", help="fp32, bf16 or fp16 for floating-point weights.")
    ] = "bf16",
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Split into files of at most this size.")
    ] = "5GB",
    tag: TagOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier export in OUT.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a Hugging Face model directory: sharded safetensors, their index and config.json."""
    with _errors("export", as_json):
        from funczero.pretrained import export_pretrained

        files = export_pretrained(
            directory, out, config_json=config_json, dtype=dtype,
            max_shard_size=max_shard_size, tag=tag, overwrite=overwrite,
        )  # fmt: skip
    _report_written(files, as_json)


@ckpt_app.command("diff", cls=CkptCommand)
def diff_cmd(
    a: Annotated[
        Path, typer.Argument(metavar="A", help="First checkpoint (root or tag directory).")
    ],
    b: Annotated[
        Path, typer.Argument(metavar="B", help="Second checkpoint (root or tag directory).")
    ],
    tag_a: Annotated[str | None, typer.Option("--tag-a", help="Tag in A.")] = None,
    tag_b: Annotated[str | None, typer.Option("--tag-b", help="Tag in B.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Also list equal tensors.")] = False,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore",
            metavar="PATTERN",
            help="Do not compare tensors whose path matches this glob (repeatable), e.g. 'rng'.",
        ),
    ] = None,
    resharded: Annotated[
        bool,
        typer.Option(
            "--resharded",
            help="B is a reshard of A: compare what resharding preserves (every value; not the "
            "RNG states when the world sizes differ, since resharding re-derives them).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Per-tensor max absolute and relative difference; exit 1 when anything differs."""
    with _errors("diff", as_json):
        from funczero.checkpoint import diff

        diffs = diff(a, b, tag_a=tag_a, tag_b=tag_b, ignore=ignore or (), resharded=resharded)
    differ = [d for d in diffs if d.status not in ("equal", "ignored")]
    if as_json:
        _emit_json({"ok": True, "equal": not differ, "tensors": [d.to_json() for d in diffs]})
    else:
        shown = diffs if show_all else differ
        rows = [
            [
                d.path,
                d.status,
                f"{d.max_abs:.3e}",
                f"{d.max_rel:.3e}",
                f"{d.dtype_a or '-'} / {d.dtype_b or '-'}",
            ]
            for d in shown
        ]
        con = _console()
        if rows:
            con.print(
                _table(
                    "differences" if not show_all else "tensors",
                    ["path", "status", "max abs", "max rel", "dtype a / b"],
                    rows,
                )
            )
        ignored = sum(d.status == "ignored" for d in diffs)
        con.print(
            f"{len(differ)} of {len(diffs)} tensors differ"
            + (f" ({ignored} ignored)" if ignored else "")
        )
    if differ:
        raise typer.Exit(EXIT_NEGATIVE)
