"""The one exception type the launcher raises for user mistakes."""

from __future__ import annotations

__all__ = ["LaunchError", "exit_code_for"]


class LaunchError(Exception):
    """A misuse of the launcher: bad flags, hostfile, env file or resources.

    The CLI prints ``str(error)`` as a single line and exits non-zero, so the
    message must name what was wrong, the offending value and how to fix it.
    """


def exit_code_for(returncode: int) -> int:
    """Map a ``Popen.returncode`` to a shell-style exit status.

    Args:
        returncode: Exit code, or ``-N`` for a process killed by signal ``N``.

    Returns:
        ``returncode`` itself for a normal exit, ``128 + N`` for signal ``N``.
    """
    return 128 - returncode if returncode < 0 else returncode
