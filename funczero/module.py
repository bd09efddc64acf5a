"""Turn an ``nn.Module`` into pure functions of explicit parameter and buffer dicts.

The module object keeps only structure: :func:`module_spec` reads its parameter names (one
canonical name per tied weight), buffer names and which parameters are frozen, and
:func:`release_module_tensors` replaces its tensors with meta tensors so the training state is
the only owner of the weights. :func:`apply_module` runs it with ``torch.func.functional_call``.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1)
    >>> spec = module_spec(lin)
    >>> params, buffers = extract_tensors(lin, spec)
    >>> out, new_buffers = apply_module(lin, spec, params, buffers, torch.ones(1, 2))
    >>> out.shape
    torch.Size([1, 1])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ModuleSpec", "apply_module", "extract_tensors", "module_spec", "release_module_tensors"]


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """Static description of a module's tensors.

    Attributes:
        params: canonical parameter FQNs in ``named_parameters()`` order (tied weights once).
        shapes: global shape of each canonical parameter.
        dtypes: dtype of each canonical parameter as built.
        aliases: every FQN of a parameter (canonical first) -> canonical FQN.
        trainable: canonical FQNs with ``requires_grad=True``.
        buffers: buffer FQNs (persistent and not).
    """

    params: tuple[str, ...]
    shapes: Mapping[str, torch.Size]
    dtypes: Mapping[str, torch.dtype]
    aliases: Mapping[str, str]
    trainable: tuple[str, ...]
    buffers: tuple[str, ...]

    def alias_names(self, canonical: str) -> tuple[str, ...]:
        """All FQNs under which ``canonical`` appears in the module (canonical first)."""
        return tuple(a for a, c in self.aliases.items() if c == canonical)

    @property
    def frozen(self) -> tuple[str, ...]:
        """Canonical FQNs of parameters that are not trained."""
        t = set(self.trainable)
        return tuple(p for p in self.params if p not in t)

    def numel(self, trainable_only: bool = False) -> int:
        """Number of parameter elements (tied weights counted once)."""
        names = self.trainable if trainable_only else self.params
        return sum(self.shapes[n].numel() for n in names)


def module_spec(module: nn.Module) -> ModuleSpec:
    """Read the static structure of ``module`` (works on meta-device modules too)."""
    canonical_of: dict[int, str] = {}
    aliases: dict[str, str] = {}
    params: list[str] = []
    shapes: dict[str, torch.Size] = {}
    dtypes: dict[str, torch.dtype] = {}
    trainable: list[str] = []
    for name, p in module.named_parameters(remove_duplicate=False):
        canonical = canonical_of.setdefault(id(p), name)
        aliases[name] = canonical
        if canonical == name:
            params.append(name)
            shapes[name] = p.shape
            dtypes[name] = p.dtype
            if p.requires_grad:
                trainable.append(name)
    buffers = tuple(name for name, _ in module.named_buffers(remove_duplicate=False))
    return ModuleSpec(tuple(params), shapes, dtypes, aliases, tuple(trainable), buffers)


def extract_tensors(
    module: nn.Module, spec: ModuleSpec
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return detached copies of ``module``'s parameters and buffers keyed by FQN."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named_buffers = dict(module.named_buffers(remove_duplicate=False))
    params = {n: named[n].detach().clone() for n in spec.params}
    buffers = {n: named_buffers[n].detach().clone() for n in spec.buffers}
    return params, buffers


def release_module_tensors(module: nn.Module) -> None:
    """Replace the module's parameters and buffers with meta tensors of the same shape.

    After this the module is only a description of the computation; running it outside
    :func:`apply_module` fails loudly on meta tensors instead of silently using stale weights.
    Tied parameters stay tied.
    """
    replaced: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        for key, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in replaced:
                meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
                replaced[id(p)] = nn.Parameter(meta, requires_grad=p.requires_grad)
            mod._parameters[key] = replaced[id(p)]
        for key, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[key] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def apply_module(
    module: nn.Module,
    spec: ModuleSpec,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    *args: Any,
    **kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``module`` on ``params`` and ``buffers`` without touching either.

    Buffers are cloned before the call, so in-place updates inside the module (BatchNorm's
    running statistics) land on the clones, which are returned as the new buffers.

    Returns:
        ``(output, new_buffers)``.
    """
    new_buffers = {k: v.clone() for k, v in buffers.items()}
    tensors: dict[str, torch.Tensor] = dict(params)
    tensors.update(new_buffers)
    out = torch.func.functional_call(module, tensors, args, kwargs, tie_weights=True, strict=False)
    return out, new_buffers
