"""``funczero launch``: a DeepSpeed-class launcher on torch.distributed.

Two tiers: the runner (:mod:`.launcher`, :mod:`.runners`, :mod:`.remote`) resolves
resources and starts one per-node launcher on every node (:mod:`.node`, or
:mod:`.elastic` under torch.distributed.elastic), which spawns and supervises the
workers. See ``docs/launcher.md``.

Importing this package is cheap: it imports neither torch nor the process code.
"""

from __future__ import annotations

from funczero.launch.errors import LaunchError as LaunchError
from funczero.launch.hostfile import apply_filters as apply_filters
from funczero.launch.hostfile import parse_hostfile as parse_hostfile
from funczero.launch.options import LaunchOptions as LaunchOptions

__all__ = ["LaunchError", "LaunchOptions", "apply_filters", "parse_hostfile"]
