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

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModuleBinding",
    "ModuleSpec",
    "Slots",
    "apply_module",
    "extract_tensors",
    "guard_released",
    "is_meta",
    "materialize",
    "module_spec",
    "release_module_tensors",
    "tensor_slots",
]

Slots = tuple[tuple[nn.Module, str, str], ...]
"""``(submodule, attribute, key)``: where each tensor of a module sits, and its key (canonical
parameter name, or buffer FQN)."""


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


_BINDINGS: contextvars.ContextVar[int] = contextvars.ContextVar("funczero_bindings", default=0)


def _refuse_unbound_call(module: nn.Module, args: Any) -> None:
    if _BINDINGS.get() == 0:
        raise RuntimeError(
            f"{type(module).__name__}'s weights live in the training state (the module itself holds "
            "meta tensors), so calling it directly would compute nothing; evaluate with "
            "funczero.train.evaluation.make_eval_step(loss_fn, plan), or call it inside "
            "`with funczero.train.evaluation.bound_module(plan, state) as model:` (sampling, export)"
        )


def guard_released(module: nn.Module) -> None:
    """Make calling ``module`` outside a :class:`ModuleBinding` a clear error (it holds no data)."""
    if not getattr(module, "_funczero_guarded", False):
        module.register_forward_pre_hook(_refuse_unbound_call)
        module._funczero_guarded = True  # type: ignore[assignment]


def release_module_tensors(module: nn.Module) -> None:
    """Replace the module's parameters and buffers with meta tensors of the same shape.

    After this the module is only a description of the computation: calling it outside a
    :class:`ModuleBinding` (the training step, :func:`funczero.train.evaluation.bound_module`)
    raises a clear error instead of computing on meta tensors. Tied parameters stay tied.
    """
    guard_released(module)
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
    token = _BINDINGS.set(_BINDINGS.get() + 1)
    try:
        out = torch.func.functional_call(module, tensors, args, kwargs, tie_weights=True, strict=False)
    finally:
        _BINDINGS.reset(token)
    return out, new_buffers


def tensor_slots(module: nn.Module, spec: ModuleSpec) -> tuple[Slots, Slots]:
    """``(parameter slots, buffer slots)`` of ``module``: every alias of every tensor.

    A tied parameter has one slot per alias, all keyed by its canonical name.
    """
    params = tuple(
        (module.get_submodule(path), attr, canonical)
        for alias, canonical in spec.aliases.items()
        for path, _, attr in [alias.rpartition(".")]
    )
    buffers = tuple(
        (module.get_submodule(path), attr, name)
        for name in spec.buffers
        for path, _, attr in [name.rpartition(".")]
    )
    return params, buffers


class ModuleBinding:
    """Point a module's parameters and buffers at given tensors until the binding ends.

    Unlike ``torch.func.functional_call``, whose binding ends when the call returns, a binding
    spans forward *and* backward, so anything that runs the module again during backward
    (activation checkpointing's recompute, including a Hugging Face model's own
    ``gradient_checkpointing_enable()``) sees the same tensors. Keys missing from a
    :meth:`bind` call keep what the module holds (``strict=False``).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1)
        >>> spec = module_spec(lin)
        >>> with ModuleBinding(*tensor_slots(lin, spec)) as binding:
        ...     binding.bind({"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, {})
        ...     lin(torch.ones(1, 2))  # the bound tensors do not require grad: no grad_fn
        tensor([[2.]])
    """

    def __init__(self, param_slots: Slots, buffer_slots: Slots) -> None:
        self.param_slots = param_slots
        self.buffer_slots = buffer_slots
        self._saved: list[tuple[dict[str, Any], str, Any]] = []

    def __enter__(self) -> ModuleBinding:
        self._token = _BINDINGS.set(_BINDINGS.get() + 1)
        self._saved = [(m._parameters, a, m._parameters[a]) for m, a, _ in self.param_slots]
        self._saved += [(m._buffers, a, m._buffers[a]) for m, a, _ in self.buffer_slots]
        return self

    def bind(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]) -> None:
        for mod, attr, key in self.param_slots:
            if key in params:
                mod._parameters[attr] = params[key]  # type: ignore[assignment]
        for mod, attr, key in self.buffer_slots:
            if key in buffers:
                mod._buffers[attr] = buffers[key]

    def unbind(self, keys: Iterable[str]) -> None:
        """Put back what the module held before the binding, for the tensors of ``keys``."""
        drop = set(keys)
        slots = (*self.param_slots, *self.buffer_slots)
        for (_, _, key), (table, attr, old) in zip(slots, self._saved):
            if key in drop:
                table[attr] = old

    def __exit__(self, *exc: object) -> None:
        for table, attr, old in self._saved:
            table[attr] = old
        self._saved = []
        _BINDINGS.reset(self._token)


@contextlib.contextmanager
def swap_parameters(slots: Slots, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily point the parameters at ``slots`` to ``tensors`` (keyed by slot key)."""
    with ModuleBinding(slots, ()) as binding:
        binding.bind(tensors, {})
        yield


InitFn = Callable[[nn.Module], None]
"""Initialises one module's own (``recurse=False``) parameters and buffers in place."""


def is_meta(module: nn.Module) -> bool:
    """Whether any of ``module``'s parameters or buffers is on the meta device (has no data)."""
    tensors = [*module.parameters(), *module.buffers()]
    return any(t.device.type == "meta" for t in tensors)


def default_init_fn(module: nn.Module) -> InitFn:
    """How to initialise each submodule of ``module``, as its author would.

    The root's ``_init_weights(submodule)`` when it has one (Hugging Face models, funczero's
    GPT); otherwise each submodule's own ``reset_parameters()`` (torch's built-in layers).
    """
    per_module = getattr(module, "_init_weights", None)
    if callable(per_module):
        return per_module

    def reset(sub: nn.Module) -> None:
        reset_parameters = getattr(sub, "reset_parameters", None)
        if callable(reset_parameters):
            reset_parameters()

    return reset


def materialize(
    module: nn.Module,
    spec: ModuleSpec,
    init_fn: InitFn | None = None,
    *,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Create and initialise a meta-device module's tensors one module (or block) at a time.

    Visits the submodules in module order; for each that owns parameters not seen before (a
    tied weight is created once) or buffers, creates them on ``device``, runs ``init_fn`` on
    it, yields ``(name, tensor)`` for each (canonical parameter names, then buffer FQNs) and
    puts meta tensors back. With the root's ``_init_weights`` (the default for Hugging Face
    models), each transformer block (a child of an ``nn.ModuleList``) is created whole and
    initialised as ``block.apply(_init_weights)`` does, children before parents, so a parent
    may re-initialise its children (GPT-2's scaled ``c_proj``). So at most one block's full
    tensors exist at a time. The global RNG is drawn in module order, the same on every rank:
    the same seed gives the same weights at any world size.

    Args:
        module: a module built on the meta device (e.g. ``with torch.device("meta"): ...``).
        spec: its :func:`module_spec`.
        init_fn: initialises one module's own tensors (default: :func:`default_init_fn`).
        device: where tensors are created (CPU by default: the same values on any device).

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     lin = torch.nn.Linear(2, 1)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> dict(materialize(lin, module_spec(lin)))["bias"].shape
        torch.Size([1])
    """
    init = init_fn or default_init_fn(module)
    # A root ``_init_weights`` (Hugging Face's convention) is applied like ``model.apply``:
    # children before parents, so a parent may re-initialise its children's tensors (GPT-2
    # rescales ``c_proj`` from its attention and MLP modules, which own no tensors).
    parents_too = init_fn is None and callable(getattr(module, "_init_weights", None))
    units = set(_outermost_units(module))
    seen: set[str] = set()
    skip_under: str | None = None
    for path, mod in module.named_modules():
        if skip_under is not None and path.startswith(skip_under):
            continue
        if path in units and parents_too:
            skip_under = path + "."
            subtree = _post_order(mod, path)
        else:
            subtree = [(path, mod)]
        yield from _materialize_group(subtree, spec, init, seen, device, parents=len(subtree) > 1)


def _outermost_units(module: nn.Module) -> list[str]:
    """The children of every outermost ``nn.ModuleList`` (the transformer blocks)."""
    units: list[str] = []
    for name, mod in module.named_modules():
        if isinstance(mod, nn.ModuleList) and not any(name == u or name.startswith(u + ".") for u in units):
            units.extend(f"{name}.{child}" if name else child for child, _ in mod.named_children())
    return units


def _post_order(mod: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """``mod``'s subtree, children before parents (the order of ``nn.Module.apply``)."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in mod.named_children():
        out.extend(_post_order(child, f"{path}.{name}" if path else name))
    out.append((path, mod))
    return out


def _materialize_group(
    modules: list[tuple[str, nn.Module]],
    spec: ModuleSpec,
    init: InitFn,
    seen: set[str],
    device: torch.device | str,
    *,
    parents: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Create the tensors ``modules`` own, run ``init`` on each module in the given order (with
    ``parents``, also on modules that own none: they may re-initialise their children's), yield
    them and put meta tensors back."""
    saved: list[tuple[dict[str, Any], str, Any]] = []
    created: list[tuple[str, torch.Tensor]] = []
    try:
        for path, mod in modules:
            prefix = f"{path}." if path else ""
            fresh = [
                (attr, p) for attr, p in mod._parameters.items()
                if p is not None and spec.aliases.get(prefix + attr, prefix + attr) not in seen
            ]  # fmt: skip
            buffers = [(attr, b) for attr, b in mod._buffers.items() if b is not None]
            if not fresh and not buffers and not parents:
                continue
            saved += [(mod._parameters, attr, p) for attr, p in fresh]
            saved += [(mod._buffers, attr, b) for attr, b in buffers]
            for attr, p in fresh:
                mod._parameters[attr] = nn.Parameter(
                    torch.empty_like(p, device=device), requires_grad=p.requires_grad
                )
                name = spec.aliases.get(prefix + attr, prefix + attr)
                seen.add(name)
                created.append((name, mod._parameters[attr]))  # type: ignore[arg-type]
            for attr, b in buffers:
                mod._buffers[attr] = torch.empty_like(b, device=device)
                created.append((prefix + attr, mod._buffers[attr]))  # type: ignore[arg-type]
            with torch.no_grad():
                init(mod)
        for name, t in created:
            yield name, t.detach()
    finally:
        for table, attr, old in reversed(saved):
            table[attr] = old
