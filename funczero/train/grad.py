"""``value_and_grad`` in the JAX sense, on ``torch.autograd.grad``.

``torch.func.grad_and_value`` differentiates with ``create_graph=True`` (about +40% peak memory on
a GPT) and refuses activation checkpointing and saved-tensor hooks, which ZeRO-2/3 rely on. The
default backend therefore differentiates detached copies of the inputs with
``torch.autograd.grad``; the ``"func"`` backend (``torch.func.grad_and_value``) stays selectable
and gives identical gradients for plain functions.

Example:
    >>> import torch
    >>> from funczero import value_and_grad
    >>> f = lambda p, x: (p["w"] * x).sum()
    >>> loss, grads = value_and_grad(f)({"w": torch.ones(3)}, torch.arange(3.0))
    >>> grads["w"]
    tensor([0., 1., 2.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from funczero import tree

Backend = Literal["autograd", "func"]

__all__ = ["Backend", "value_and_grad"]


def _check_scalar(value: Any) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(
            f"value_and_grad: the function must return a 0-d tensor (the loss), got {shape}; "
            "reduce it with .mean() or .sum(), or return (loss, aux) with has_aux=True"
        )


def value_and_grad(
    fn: Callable[..., Any], *, has_aux: bool = False, backend: Backend = "autograd"
) -> Callable[..., tuple[Any, Any]]:
    """Return a function computing ``fn(params, *args)`` and its gradient w.r.t. ``params``.

    ``params`` is any pytree of floating tensors. Its tensors are not modified and gain no
    autograd history. With ``has_aux=True``, ``fn`` returns ``(loss, aux)`` and the result is
    ``((loss, aux), grads)``; ``aux`` is detached.

    Args:
        fn: a function ``fn(params, *args, **kwargs)`` returning a 0-d loss tensor.
        has_aux: whether ``fn`` returns ``(loss, aux)``.
        backend: ``"autograd"`` (default; ``torch.autograd.grad`` on detached leaves, compatible
            with checkpointing, saved-tensor hooks and collectives in backward) or ``"func"``
            (``torch.func.grad_and_value``).
    """
    if backend not in ("autograd", "func"):
        raise ValueError(f"value_and_grad: unknown backend {backend!r}; use 'autograd' or 'func'")

    if backend == "func":

        def func_fn(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            def inner(p: Any) -> Any:
                out = fn(p, *args, **kwargs)
                loss, aux = out if has_aux else (out, None)
                _check_scalar(loss)
                # torch.func's aux must be tensors only, so None never goes through it.
                return loss, ((loss.detach(), aux) if has_aux else loss.detach())

            grads, value = torch.func.grad(inner, has_aux=True)(params)
            return value, grads

        return func_fn

    def autograd_fn(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        leaves, spec = tree.flatten(params)
        with torch.enable_grad():
            inputs = [leaf.detach().requires_grad_() for leaf in leaves]
            out = fn(tree.unflatten(spec, inputs), *args, **kwargs)
            loss, aux = out if has_aux else (out, None)
            _check_scalar(loss)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        aux = tree.map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux)
        value = (loss.detach(), aux) if has_aux else loss.detach()
        return value, tree.unflatten(spec, grads)

    return autograd_fn
