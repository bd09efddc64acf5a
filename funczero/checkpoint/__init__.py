"""Sharded safetensors checkpoints: atomic, exactly resumable, reshardable to any world size.

Tensors live in safetensors files (one pair per rank), metadata in ``index.json``; nothing is
ever unpickled. See ``docs/checkpoint-format.md`` for the format and ``funczero ckpt --help``
for the command-line tools.

Example:
    >>> import tempfile
    >>> from funczero import checkpoint
    >>> from funczero.testing.states import toy_state
    >>> root = tempfile.mkdtemp()
    >>> _ = checkpoint.save(root, toy_state(), client_state={"epoch": 1}, keep_last=2)
    >>> checkpoint.list_tags(root)
    ['3']
    >>> state, client = checkpoint.load(root, like=toy_state(seed=9))
    >>> int(state.step), client
    (3, {'epoch': 1})
"""

from __future__ import annotations

from funczero.checkpoint.consolidation import consolidate as consolidate
from funczero.checkpoint.diffing import TensorDiff as TensorDiff
from funczero.checkpoint.diffing import diff as diff
from funczero.checkpoint.errors import CheckpointError as CheckpointError
from funczero.checkpoint.errors import CheckpointExistsError as CheckpointExistsError
from funczero.checkpoint.errors import CheckpointNotFoundError as CheckpointNotFoundError
from funczero.checkpoint.errors import ClientStateError as ClientStateError
from funczero.checkpoint.errors import CorruptCheckpointError as CorruptCheckpointError
from funczero.checkpoint.errors import InvalidTagError as InvalidTagError
from funczero.checkpoint.errors import SaveError as SaveError
from funczero.checkpoint.errors import StateMismatchError as StateMismatchError
from funczero.checkpoint.errors import UnsafePathError as UnsafePathError
from funczero.checkpoint.index import read_index as read_index
from funczero.checkpoint.inspection import Summary as Summary
from funczero.checkpoint.inspection import inspect as inspect
from funczero.checkpoint.loading import load as load
from funczero.checkpoint.resharding import reshard as reshard
from funczero.checkpoint.saving import save as save
from funczero.checkpoint.tags import latest_tag as latest_tag
from funczero.checkpoint.tags import list_tags as list_tags
from funczero.checkpoint.tags import resolve as resolve
from funczero.checkpoint.verification import VerifyReport as VerifyReport
from funczero.checkpoint.verification import verify as verify

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ClientStateError",
    "CorruptCheckpointError",
    "InvalidTagError",
    "SaveError",
    "StateMismatchError",
    "Summary",
    "TensorDiff",
    "UnsafePathError",
    "VerifyReport",
    "consolidate",
    "diff",
    "inspect",
    "latest_tag",
    "list_tags",
    "load",
    "read_index",
    "reshard",
    "resolve",
    "save",
    "verify",
]
