"""Every funczero module imports with only the core dependencies, and without a GPU.

CI collects the docstring examples of every module (``pytest --doctest-modules funczero``), which
imports each one; the optional extras (``tensorboard``, ``wandb``, ``comet``, ``plot``) must be
imported only where they are used, so a missing extra is an error of the feature that needs it,
never of ``import funczero.x``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import funczero

OPTIONAL = ("tensorboard", "wandb", "comet_ml", "matplotlib")

_IMPORT_ALL = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {optional!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)")
            return None

    sys.meta_path.insert(0, Missing())
    import torch
    torch.cuda.is_available = lambda: False  # as on a machine without a GPU
    import funczero
    failed = []
    names = [m.name for m in pkgutil.walk_packages(funczero.__path__, "funczero.")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
    print(len(names), "modules")
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
    """
).format(optional=OPTIONAL)


def test_every_module_imports_without_optional_extras_or_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    count = int(proc.stdout.split()[0])
    root = Path(funczero.__file__).parent
    assert count >= len(list(root.glob("**/*.py"))) - 1  # walked them all (not __main__ only)
