"""Regional compilation: each unit's forward compiled once per unit type, inside the step.

The functional step cannot be handed to ``torch.compile`` whole: its unit boundaries issue
collectives from autograd Functions, and stage 3 gathers parameters as modules run. What
compiles well is the computation *between* the boundaries: a unit module's own ``forward``
(a transformer block). :func:`compile_unit_forwards` compiles that function once per module
class (``torch.compile(Block.forward)``) and calls it on each unit module, so 24 identical
blocks share one graph: Dynamo reads a module's parameters as graph inputs, and the step's
parameters (full tensors at stages 0-2, gathered views at stage 3) keep their shapes, dtypes
and strides from step to step, so nothing recompiles. The boundaries, collectives and
prefetching stay eager, outside the graphs: no graph breaks at unit boundaries.

The compiled functions hold Dynamo's caches, so they live in the closure of the step function
that uses them (:func:`funczero.make_train_step`), not in the frozen plan.

Example:
    >>> CompileOptions.from_config({"enabled": True, "backend": "eager"}).backend
    'eager'
    >>> CompileOptions.from_config({"enabled": False}) is None
    True
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["CompileOptions", "UnitForwards", "compile_unit_forwards", "resolve_compile"]

UnitForwards = Mapping[str, Callable[..., Any]]
"""Unit FQN -> its module's forward to run in the step (compiled)."""

_BACKENDS_HINT = "see torch._dynamo.list_backends() (\"inductor\", \"aot_eager\", \"eager\", ...)"


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """How to compile each unit's forward (the arguments of ``torch.compile``).

    Attributes:
        backend: a ``torch.compile`` backend name (``"inductor"``) or callable.
        mode: ``None``, ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``, ...
        fullgraph: fail instead of breaking a unit's graph (a graph break inside a block costs
            speed, not correctness, so it is off by default).
        dynamic: ``torch.compile``'s ``dynamic`` (None: recompile once with dynamic shapes if a
            shape changes; False: one graph per shape).
        options: backend options (``torch.compile(options=...)``).
    """

    backend: str | Callable[..., Any] = "inductor"
    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.backend, str) and self.backend not in torch._dynamo.list_backends(None):
            raise ValueError(f"compile backend={self.backend!r} is not a torch.compile backend; {_BACKENDS_HINT}")
        if self.mode is not None and self.options:
            raise ValueError(
                f"compile mode={self.mode!r} and options={dict(self.options)!r} were both given; "
                "torch.compile takes one of them: drop mode or move it into options"
            )

    @classmethod
    def from_config(cls, block: Mapping[str, Any]) -> CompileOptions | None:
        """From DeepSpeed's ``"compile"`` block: ``{"enabled", "backend", "kwargs"}``.

        ``kwargs`` are ``torch.compile``'s keyword arguments (``mode``, ``fullgraph``,
        ``dynamic``, ``options``). Returns None when ``enabled`` is false.
        """
        if not block.get("enabled", False):
            return None
        kwargs = dict(block.get("kwargs") or {})
        unknown = sorted(set(kwargs) - {"mode", "fullgraph", "dynamic", "options"})
        if unknown:
            raise ValueError(
                f"compile.kwargs has {unknown}, which torch.compile does not take per region; "
                "use mode, fullgraph, dynamic or options"
            )
        return cls(backend=block.get("backend", "inductor"), **kwargs)

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``torch.compile(fn)`` with these options."""
        return torch.compile(
            fn, backend=self.backend, mode=self.mode, fullgraph=self.fullgraph,
            dynamic=self.dynamic, options=dict(self.options) or None,
        )  # fmt: skip


def resolve_compile(compile: bool | CompileOptions | None) -> CompileOptions | None:
    """``True`` -> default options; ``False``/None -> no compilation."""
    if compile is True:
        return CompileOptions()
    if compile is False or compile is None:
        return None
    if not isinstance(compile, CompileOptions):
        raise TypeError(f"compile={compile!r} must be a bool or a CompileOptions")
    return compile


def compile_unit_forwards(
    module: nn.Module, units: tuple[str, ...], options: CompileOptions | None
) -> UnitForwards:
    """Each unit module's compiled forward, one ``torch.compile`` per module class.

    Args:
        module: the model.
        units: FQNs of the unit modules (:attr:`ZeroPlan.wrapped`).
        options: how to compile; None returns ``{}`` (every unit runs eagerly).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> fwd = compile_unit_forwards(model, ("0", "1"), CompileOptions(backend="eager"))
        >>> fwd["0"](torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """
    if options is None:
        return {}
    if getattr(getattr(module, "config", None), "use_cache", False):
        warnings.warn(
            f"{type(module).__name__}.config.use_cache is True: a Hugging Face model then builds a "
            "KV cache in training, whose per-layer guards recompile every block (torch.compile "
            "stops at its recompile limit and runs the rest eagerly); set "
            "model.config.use_cache = False for training",
            stacklevel=3,
        )
    by_class: dict[type, Callable[..., Any]] = {}
    out: dict[str, Callable[..., Any]] = {}
    for name in units:
        mod = module.get_submodule(name)
        cls = type(mod)
        if cls not in by_class:
            by_class[cls] = options.compile(cls.forward)
        out[name] = functools.partial(by_class[cls], mod)
    return out
