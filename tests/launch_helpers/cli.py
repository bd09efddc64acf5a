"""Run the ``funczero`` CLI without executing ``funczero/__init__.py``.

The package ``__init__`` imports torch (about a second per process); the launcher
does not need it, and the tests start the CLI dozens of times. A bare package
module with the right ``__path__`` lets ``funczero.cli.app`` import normally.
One test runs the real ``python -m funczero.cli.app`` as well.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[2] / "funczero"

if "funczero" not in sys.modules:
    stub = types.ModuleType("funczero")
    stub.__path__ = [str(_PACKAGE)]
    sys.modules["funczero"] = stub

from funczero.cli.app import main

if __name__ == "__main__":
    main()
