"""funczero: JAX-style functional training for PyTorch with DeepSpeed's ZeRO built in.

The training state is an immutable pytree of tensors (:class:`TrainState`); a step is a pure
function ``train_step(state, batch) -> (state, metrics)`` built by :func:`make_train_step`, with
ZeRO stages 0-3 as explicit collective transforms (:mod:`funczero.parallel.stages`). A DeepSpeed
user starts with :func:`initialize`.

Attributes are imported lazily, so ``import funczero`` (and the ``funczero`` CLI, whose launcher
never needs torch) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "Config": ("funczero.config", "Config"),
    "DonatedStateError": ("funczero.train.state", "DonatedStateError"),
    "MicroBatches": ("funczero.loss", "MicroBatches"),
    "TokenLoss": ("funczero.loss", "TokenLoss"),
    "Initialized": ("funczero.initialization", "Initialized"),
    "MetricsLogger": ("funczero.train.metrics", "MetricsLogger"),
    "Precision": ("funczero.parallel.precision", "Precision"),
    "TrainState": ("funczero.train.state", "TrainState"),
    "add_config_arguments": ("funczero.cli_args", "add_config_arguments"),
    "ZeroPlan": ("funczero.parallel.plan", "ZeroPlan"),
    "build_plan": ("funczero.parallel.plan", "build_plan"),
    "checkpoint": ("funczero.checkpoint", None),
    "functional": ("funczero.module", None),  # the old name of funczero.module
    "module": ("funczero.module", None),
    "init_distributed": ("funczero.parallel.env", "init_distributed"),
    "init_state": ("funczero.train.step", "init_state"),
    "initialize": ("funczero.initialization", "initialize"),
    "make_train_step": ("funczero.train.step", "make_train_step"),
    "make_eval_step": ("funczero.train.evaluation", "make_eval_step"),
    "bound_module": ("funczero.train.evaluation", "bound_module"),
    "full_state_dict": ("funczero.train.evaluation", "full_state_dict"),
    "optim": ("funczero.optim", None),
    "pretrained": ("funczero.pretrained", None),
    "load_pretrained": ("funczero.pretrained", "load_pretrained"),
    "export_pretrained": ("funczero.pretrained", "export_pretrained"),
    "shutdown": ("funczero.parallel.env", "shutdown"),
    "read_metrics": ("funczero.train.metrics", "read_metrics"),
    "tree": ("funczero.tree", None),
    "value_and_grad": ("funczero.train.grad", "value_and_grad"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'funczero' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
