"""The exceptions a checkpoint operation raises.

Every message names what was wrong, the offending path or value, and the fix. Catch
:class:`CheckpointError` to handle all of them.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ClientStateError",
    "CorruptCheckpointError",
    "InvalidTagError",
    "SaveError",
    "StateMismatchError",
    "UnsafePathError",
]


class CheckpointError(Exception):
    """Base class of every checkpoint error."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory, the tag or the ``latest`` pointer does not exist."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The destination already holds a checkpoint (or output) that would be overwritten."""


class InvalidTagError(CheckpointError, ValueError):
    """A tag is empty, contains a path separator or ``..``, or is otherwise not a plain name."""


class ClientStateError(CheckpointError, TypeError):
    """``client_state`` (or ``config``) is not JSON-serialisable."""


class SaveError(CheckpointError):
    """Writing a checkpoint failed (on this or another rank); nothing was committed."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint on disk is damaged: malformed index, missing, truncated or foreign file,
    checksum mismatch.

    Attributes:
        problems: one line per problem found (a file or tensor path and what is wrong with it).
    """

    def __init__(self, problems: str | Iterable[str], *, where: str = "") -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        head = f"checkpoint {where} is damaged" if where else "checkpoint is damaged"
        if len(self.problems) == 1:
            message = f"{head}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{head} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


class UnsafePathError(CorruptCheckpointError):
    """A file name from checkpoint metadata would escape the checkpoint directory."""


class StateMismatchError(CheckpointError):
    """The checkpoint does not fit the ``like`` state: missing or unexpected tensors, shape,
    dtype or precision mismatches. All problems are listed, one per line, by path.

    Attributes:
        missing: paths the state has and the checkpoint lacks.
        unexpected: paths the checkpoint has and the state lacks.
        mismatched: ``"path: what differs"`` lines for shapes, dtypes and layouts.
    """

    def __init__(
        self,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
        where: str = "",
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"missing from the checkpoint: {p}" for p in self.missing]
        lines += [f"unexpected in the checkpoint (not in the state): {p}" for p in self.unexpected]
        lines += self.mismatched
        body = "\n".join(f"  - {line}" for line in lines)
        super().__init__(
            f"checkpoint {where} does not match the state passed as like= "
            f"({len(lines)} problems):\n{body}\n"
            "Build `like` from the same model and optimizer configuration the checkpoint was "
            "saved with (world size and ZeRO stage may differ)."
        )
