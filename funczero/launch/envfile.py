"""Environment files and the variables exported to every node.

``.funczero_env`` holds ``KEY=VALUE`` lines. It is read from the home directory and
then from the working directory (which wins for the same key); ``--env_file`` names
one file to read instead. Blank lines, ``# comments`` and an ``export `` prefix are
allowed. Values are taken literally: no ``$VAR`` expansion, no command
substitution, no escapes; one pair of matching outer quotes is removed. As in shells
and python-dotenv, `` # comment`` after an unquoted value (a ``#`` after
whitespace) or after a quoted one is dropped; ``a#b`` keeps its ``#``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from funczero.launch.errors import LaunchError
from funczero.launch.hostfile import read_text_file
from funczero.launch.procs import ARG_STRLEN_MAX

__all__ = [
    "ENV_FILE_NAME",
    "EXPORT_PREFIXES",
    "default_env_files",
    "exported_environment",
    "load_env_files",
    "parse_env_text",
]

ENV_FILE_NAME = ".funczero_env"

#: Variables whose names start with these are copied from the launcher's environment.
EXPORT_PREFIXES = ("NCCL", "PYTHON", "UCX")

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A quoted value: the shortest quoted text after which only whitespace and a comment remain.
_QUOTED = re.compile(r"""(["'])(.*?)\1\s*(?:#.*)?""", re.DOTALL)
_TRAILING_COMMENT = re.compile(r"\s+#.*", re.DOTALL)


def _value(text: str) -> str:
    """The value of ``KEY=text``: unquoted, its trailing comment dropped."""
    quoted = _QUOTED.fullmatch(text)
    if quoted is not None:
        return quoted.group(2)
    return _TRAILING_COMMENT.sub("", text)


def parse_env_text(text: str, source: str) -> dict[str, str]:
    """Parse env-file text into ``{key: value}``.

    Args:
        text: File content.
        source: Name used in messages, e.g. the path.

    Returns:
        The variables in file order; a later line wins for a repeated key.

    Raises:
        LaunchError: If a line has no ``=``, the key is not a valid name, or the value
            holds a NUL character or is too long to pass to a program.

    Example:
        >>> parse_env_text('A=1 # one\\nB="x # y" # z\\nexport C=a#b\\n', "f")
        {'A': '1', 'B': 'x # y', 'C': 'a#b'}
    """
    result: dict[str, str] = {}
    # Only "\n" ends a line: str.splitlines() would also split a value at U+2028 etc.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r").strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise LaunchError(
                f"env file {source} line {number}: {line!r} has no '='; write KEY=VALUE "
                "or start the line with '#' to make it a comment"
            )
        if not _KEY.fullmatch(key):
            raise LaunchError(
                f"env file {source} line {number}: {key!r} is not a valid variable name; "
                "use letters, digits and '_' and do not start with a digit"
            )
        value = _value(value.strip())
        if "\0" in value:
            raise LaunchError(
                f"env file {source} line {number}: the value of {key} contains a NUL character, "
                "which no environment variable can hold; remove it"
            )
        size = len(f"{key}={value}".encode()) + 1
        if size > ARG_STRLEN_MAX:
            raise LaunchError(
                f"env file {source} line {number}: {key} is {size:,} bytes, over Linux's limit "
                f"of {ARG_STRLEN_MAX:,} bytes for one variable; put the data in a file and its "
                "path in the variable"
            )
        result[key] = value
    return result


def default_env_files(home: Path | None = None, cwd: Path | None = None) -> list[Path]:
    """Return ``~/.funczero_env`` and ``./.funczero_env`` in reading order."""
    home = Path.home() if home is None else home
    cwd = Path.cwd() if cwd is None else cwd
    files = [home / ENV_FILE_NAME, cwd / ENV_FILE_NAME]
    # Running from the home directory must not read the same file twice.
    return files[:1] if files[0].resolve() == files[1].resolve() else files


def load_env_files(explicit: str | Path | None = None) -> dict[str, str]:
    """Load the env file(s) that apply to this launch.

    Args:
        explicit: ``--env_file``. When given, only this file is read and it must exist;
            otherwise the default files are read when present.

    Returns:
        The merged variables; later files override earlier ones.

    Raises:
        LaunchError: If the explicit file is missing or any file is malformed.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise LaunchError(
                f"--env_file {str(explicit)!r} does not exist; pass an existing "
                "KEY=VALUE file or drop the flag"
            )
        files = [path]
    else:
        files = [p for p in default_env_files() if p.exists()]
    merged: dict[str, str] = {}
    for path in files:
        text = read_text_file(path, "env file")
        merged.update(parse_env_text(text, str(path)))
    return merged


def exported_environment(
    environ: Mapping[str, str] | None = None, env_file_vars: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return the variables every node must see: NCCL*, PYTHON*, UCX* and the env file.

    Args:
        environ: The launcher's environment; ``os.environ`` by default.
        env_file_vars: Variables from :func:`load_env_files`; they win over ``environ``.
    """
    environ = os.environ if environ is None else environ
    exported = {k: v for k, v in environ.items() if k.startswith(EXPORT_PREFIXES)}
    exported.update(env_file_vars or {})
    return exported
