"""funczero: JAX-style functional training for PyTorch with DeepSpeed's ZeRO built in.

The training state is an immutable pytree of tensors (:class:`TrainState`); a step is a pure
function ``train_step(state, batch) -> (state, metrics)`` built by :func:`make_train_step`, with
ZeRO stages 0-3 as explicit collective transforms (:mod:`funczero.parallel.zero`). A DeepSpeed
user starts with :func:`initialize`.
"""

from __future__ import annotations

from funczero import functional as functional
from funczero import optim as optim
from funczero import tree as tree
from funczero.grad import value_and_grad as value_and_grad
from funczero.parallel.env import init_distributed as init_distributed
from funczero.parallel.zero import ZeroPlan as ZeroPlan
from funczero.parallel.zero import build_plan as build_plan
from funczero.precision import Precision as Precision
from funczero.state import DonatedStateError as DonatedStateError
from funczero.state import TrainState as TrainState
from funczero.step import init_state as init_state
from funczero.step import make_train_step as make_train_step

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: config/data/initialize pull in more modules
    if name in ("initialize", "Initialized"):
        from funczero import initialization as _init

        return getattr(_init, name)
    if name == "Config":
        from funczero.config import Config

        return Config
    raise AttributeError(f"module 'funczero' has no attribute {name!r}")


__all__ = [
    "Config",
    "DonatedStateError",
    "Initialized",
    "Precision",
    "TrainState",
    "ZeroPlan",
    "build_plan",
    "functional",
    "init_distributed",
    "init_state",
    "initialize",
    "make_train_step",
    "optim",
    "tree",
    "value_and_grad",
]
