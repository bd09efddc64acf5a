"""Random state that lives in the training state.

The state's ``rng`` is the byte state of the compute device's generator. A step runs under
``torch.random.fork_rng`` seeded from it and returns the advanced state, so dropout is
reproducible from the state alone and the caller's global RNG is left untouched. Each rank
starts from ``seed + rank`` so data-parallel ranks draw different masks.

Example:
    >>> import torch
    >>> key = init_rng(0, device=torch.device("cpu"))
    >>> with rng_scope(key, torch.device("cpu")) as scope:
    ...     a = torch.rand(1)
    >>> with rng_scope(key, torch.device("cpu")):
    ...     b = torch.rand(1)
    >>> bool(a == b)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["RngScope", "init_rng", "rng_scope"]


def init_rng(seed: int, *, device: torch.device, rank: int = 0) -> torch.Tensor:
    """Return the generator state for ``seed + rank`` on ``device`` (a CPU uint8 tensor)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) + int(rank))
    return gen.get_state()


class RngScope:
    """Holds the generator state produced inside :func:`rng_scope`."""

    def __init__(self) -> None:
        self.new_state: torch.Tensor | None = None


@contextlib.contextmanager
def rng_scope(state: torch.Tensor, device: torch.device) -> Iterator[RngScope]:
    """Run the body with the device's default generator set to ``state``; restore it after."""
    scope = RngScope()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.set_rng_state(state, index)
            yield scope
            scope.new_state = torch.cuda.get_rng_state(index)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            yield scope
            scope.new_state = torch.get_rng_state()
