"""In-place ``torch._foreach_*`` steps for optimizers without a usable fused kernel.

Used by Lion, LAMB, and Adam/AdamW when the fused kernel cannot run (scheduled ``b1``, bf16
parameters with fp32 moments, a device without the kernel). Each step computes what the pure
transforms compute, with the moments updated in place, one scratch buffer per parameter for the
direction, and the decay and learning rate folded into ``alpha`` of in-place adds; it agrees with
``update`` + ``apply_updates`` to rounding (a few ulp).

These paths assume ``found_inf is None``; a step that may be skipped takes the exact generic path
(:func:`funczero.optim.inplace.inplace_update`), which selects old values with ``torch.where``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from funczero.optim._common import bias_correction as _bias_correction
from funczero.optim._common import keys_of, resolve
from funczero.optim.base import OptState, Params, ReduceFn, ScalarOrSchedule, Updates
from funczero.optim.clipping import trust_ratios
from funczero.optim.masks import DecayMask

__all__: list[str] = []


def _like(x: Tensor, tensors: list[Tensor]) -> Tensor | list[Tensor]:
    """A 0-d scalar in the dtype of ``tensors`` (as the pure path casts it), or one per tensor."""
    first = tensors[0]
    if all(t.dtype == first.dtype and t.device == first.device for t in tensors):
        return x.to(device=first.device, dtype=first.dtype)
    return [x.to(device=t.device, dtype=t.dtype) for t in tensors]


def _lerp_(starts: list[Tensor], ends: list[Tensor], weight: float | Tensor) -> None:
    if isinstance(weight, Tensor):  # the foreach overload takes a Python scalar only
        for s, e in zip(starts, ends):
            s.lerp_(e, weight.to(device=s.device, dtype=s.dtype))
    else:
        torch._foreach_lerp_(starts, ends, weight)


def _decayed(keys: list[str], params: list[Tensor], mask: DecayMask | None) -> list[int] | None:
    """Indices of the parameters ``mask`` decays; ``None`` when it decays all of them."""
    if mask is None:
        return None
    return [i for i, (k, p) in enumerate(zip(keys, params)) if mask(k, p)]


def _pick(tensors: list[Tensor], indices: list[int] | None) -> list[Tensor]:
    return tensors if indices is None else [tensors[i] for i in indices]


def _add_decay_(
    updates: list[Tensor], params: list[Tensor], weight_decay: float, decayed: list[int] | None
) -> None:
    """``u += wd * p`` in place for the decayed parameters (``add_decayed_weights`` without its
    temporaries)."""
    us, ps = _pick(updates, decayed), _pick(params, decayed)
    if weight_decay != 0.0 and us:
        torch._foreach_add_(us, ps, alpha=weight_decay)


def _apply_(
    params: list[Tensor], updates: list[Tensor], lr: float | Tensor, scale: Tensor | None = None
) -> None:
    """``p += u * -lr`` (times a per-parameter ``scale``, LAMB's trust ratio), in one pass for a
    float rate; ``updates`` is a scratch buffer."""
    if scale is not None:
        torch._foreach_mul_(updates, list((scale * -lr).unbind()))
        torch._foreach_add_(params, updates)
    elif isinstance(lr, Tensor):
        torch._foreach_mul_(updates, _like(-lr, updates))
        torch._foreach_add_(params, updates)
    else:
        torch._foreach_add_(params, updates, alpha=-lr)


def adam_direction_(
    grads: list[Tensor],
    mu: list[Tensor],
    nu: list[Tensor],
    *,
    b1: float | Tensor,
    b2: float,
    eps: float,
    bias_correction: bool,
    count: Tensor,
) -> list[Tensor]:
    """Advance Adam's moments in place and return the direction (new tensors)."""
    gs = [g.to(m.dtype) for g, m in zip(grads, mu)]
    _lerp_(mu, gs, 1 - b1)
    torch._foreach_mul_(nu, b2)
    torch._foreach_addcmul_(nu, gs, gs, value=1 - b2)
    denom = torch._foreach_sqrt(nu)
    if bias_correction:
        bc1 = _bias_correction(b1, count)
        bc2_sqrt = _bias_correction(b2, count).sqrt()
        torch._foreach_div_(denom, _like(bc2_sqrt, denom))
        torch._foreach_add_(denom, eps)
        direction = torch._foreach_div(mu, denom)
        torch._foreach_div_(direction, _like(bc1, direction))
        return direction
    torch._foreach_add_(denom, eps)
    return torch._foreach_div(mu, denom)


def adam_step_(
    grads: Updates,
    params: Params,
    adam_state: OptState,
    *,
    learning_rate: float | Tensor,
    b1: ScalarOrSchedule,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    bias_correction: bool = True,
    trust_ratio: tuple[float, float] | None = None,
    reduce_fn: ReduceFn | None = None,
    mask: DecayMask | None = None,
) -> None:
    """Adam (L2), AdamW (decoupled) or LAMB (decoupled + per-parameter trust ratio), in place.

    Keys are processed in sorted order so LAMB's stacked norms line up on every rank. ``mask``
    selects the parameters that are decayed (``None``: all).
    """
    keys = sorted(grads)
    ps = keys_of(params, keys)
    gs = keys_of(grads, keys)
    decayed = _decayed(keys, ps, mask)
    if not decoupled and weight_decay != 0.0 and decayed != []:
        # grads are not ours to mutate: decayed ones are replaced by new tensors
        l2 = torch._foreach_add(_pick(gs, decayed), _pick(ps, decayed), alpha=weight_decay)
        if decayed is None:
            gs = l2
        else:
            gs = list(gs)
            for i, g in zip(decayed, l2):
                gs[i] = g
    count = adam_state.count
    direction = adam_direction_(
        gs,
        keys_of(adam_state.mu, keys),
        keys_of(adam_state.nu, keys),
        b1=resolve(b1, count),
        b2=b2,
        eps=eps,
        bias_correction=bias_correction,
        count=count,
    )
    if decoupled:
        _add_decay_(direction, ps, weight_decay, decayed)
    ratios = None
    if trust_ratio is not None:
        ratios = trust_ratios(
            ps, direction, min_coeff=trust_ratio[0], max_coeff=trust_ratio[1], reduce_fn=reduce_fn
        )
    _apply_(ps, direction, learning_rate, ratios)


def lion_step_(
    grads: Updates,
    params: Params,
    mu_tree: Params,
    *,
    learning_rate: float | Tensor,
    b1: float | Tensor,
    b2: float,
    weight_decay: float,
    mask: DecayMask | None = None,
) -> None:
    """Lion in place: ``p -= lr * (sign(lerp(m, g, 1 - b1)) + wd * p)``; ``m = lerp(m, g, 1 - b2)``.

    ``mask`` selects the parameters that are decayed (``None``: all).
    """
    keys = list(grads)
    ps = keys_of(params, keys)
    mu = keys_of(mu_tree, keys)
    gs = [g.to(m.dtype) for g, m in zip(keys_of(grads, keys), mu)]
    if isinstance(b1, Tensor):
        w = 1 - b1
        direction = [torch.lerp(m, g, w.to(device=m.device, dtype=m.dtype)) for m, g in zip(mu, gs)]
    else:
        direction = torch._foreach_lerp(mu, gs, 1 - b1)
    torch._foreach_sign_(direction)
    _add_decay_(direction, ps, weight_decay, _decayed(keys, ps, mask))
    _apply_(ps, direction, learning_rate)
    _lerp_(mu, gs, 1 - b2)
