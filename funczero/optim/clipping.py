"""Norm-based transforms that are correct on ZeRO shards: global clipping and LAMB's trust ratio.

Under ZeRO each rank holds a 1-D zero-padded shard of every parameter, so a norm over a whole
parameter or the whole model is ``sqrt(reduce_fn(local sum of squares))``. ``reduce_fn`` is the
``extra`` keyword the training step passes to every update (an all-reduce SUM; ``None`` means the
tensors are whole). Each transform issues exactly one collective per update.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> g = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    >>> optim.global_norm(g)
    tensor(5.)
    >>> tx = optim.clip_by_global_norm(1.0)
    >>> tx.update(g, tx.init(g))[0]["b"]
    tensor([0.8000])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from funczero.optim._common import check_float, reduce, require_params, sum_squares
from funczero.optim.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ReduceFn,
    Updates,
)

__all__ = [
    "CLIP_NORM_EPS",
    "clip_by_global_norm",
    "clip_coefficient",
    "global_norm",
    "scale_by_trust_ratio",
]

CLIP_NORM_EPS = 1e-6
"""Added to the norm before dividing: ``torch.nn.utils.clip_grad_norm_``'s and DeepSpeed's value."""


def global_norm(tree: dict[str, Tensor], reduce_fn: ReduceFn | None = None) -> Tensor:
    """Return the L2 norm of all tensors in ``tree`` as a 0-d tensor.

    Accumulates in at least float32 (float32 for fp32/bf16/fp16 trees, float64 if a leaf is
    float64). Under ZeRO, pass ``reduce_fn`` so shards' partial sums of squares are summed across
    ranks before the root: the result is the norm of the full, unsharded tree on every rank.

    Args:
        tree: Dict of tensors (whole parameters or local shards).
        reduce_fn: All-reduce SUM over the ranks holding the other shards, or ``None``.

    Returns:
        ``sqrt(reduce_fn(sum of squares))`` (0 for an empty tree).

    Example:
        >>> import torch
        >>> global_norm({"w": torch.tensor([1.0, 2.0, 2.0])})
        tensor(3.)
    """
    leaves = list(tree.values())
    sq = sum_squares(leaves).sum()
    if leaves:
        sq = sq.to(leaves[0].device)
    return reduce(sq, reduce_fn).sqrt()


def clip_coefficient(grad_norm: Tensor, max_norm: float) -> Tensor:
    """The factor that clips a gradient of norm ``grad_norm`` to at most ``max_norm``.

    ``min(1, max_norm / (grad_norm + CLIP_NORM_EPS))``: DeepSpeed's ``gradient_clipping`` and
    ``torch.nn.utils.clip_grad_norm_``, computed on the device (no host sync). An inf or nan norm
    gives 0 or nan: skip such a step (``found_inf``) rather than apply it.

    Args:
        grad_norm: The global gradient norm, a 0-d tensor (e.g. from :func:`global_norm`).
        max_norm: Largest allowed norm, > 0.

    Returns:
        A 0-d tensor in ``grad_norm``'s dtype and device, in (0, 1].

    Example:
        >>> import torch
        >>> clip_coefficient(torch.tensor(4.0), 1.0)
        tensor(0.2500)
        >>> clip_coefficient(torch.tensor(0.5), 1.0)
        tensor(1.)
    """
    if not max_norm > 0:
        raise ValueError(
            f"clip_coefficient: max_norm={max_norm!r} must be > 0 (0 disables clipping)"
        )
    return torch.clamp(max_norm / (grad_norm + CLIP_NORM_EPS), max=1.0)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates by :func:`clip_coefficient` of their global norm.

    Matches ``torch.nn.utils.clip_grad_norm_`` and DeepSpeed's ``gradient_clipping`` (including
    their ``1e-6``), computed without a host sync. Reads ``reduce_fn`` from the update's extra
    keyword arguments, so it clips by the norm of the full model under ZeRO. Its in-place
    ``transform_`` scales the updates' own tensors (bit for bit the pure result), so
    ``chain(clip_by_global_norm(c), adamw(lr))`` keeps AdamW's fused ``update_``.

    Args:
        max_norm: Largest allowed global norm, > 0.

    Returns:
        A stateless transform.

    Example:
        >>> import torch
        >>> tx = clip_by_global_norm(2.0)
        >>> tx.update({"w": torch.tensor([6.0, 8.0])}, tx.init({}))[0]["w"]
        tensor([1.2000, 1.6000])
    """
    max_norm = check_float("clip_by_global_norm", "max_norm", max_norm, low=0.0)
    if max_norm == 0.0:
        raise ValueError(
            "clip_by_global_norm: max_norm=0.0 must be > 0 (it would zero every update)"
        )

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        del params
        coef = clip_coefficient(global_norm(updates, extra.get("reduce_fn")), max_norm)
        return {k: (u * coef).to(u.dtype) for k, u in updates.items()}, state

    def transform_(
        updates: Updates,
        state: OptState,
        params: Params | None = None,
        *,
        found_inf: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> OptState:
        del params, found_inf
        coef = clip_coefficient(global_norm(updates, reduce_fn), max_norm)
        us = list(updates.values())
        if not us:
            return state
        if all(u.dtype == coef.dtype and u.device == coef.device for u in us):
            torch._foreach_mul_(us, coef)
        else:  # u.mul_(coef) rounds like (u * coef).to(u.dtype): a 0-d coef does not promote u
            for u in us:
                u.mul_(coef.to(u.device))
        return state

    return GradientTransformation(init_fn, update_fn, transform_=transform_)


def scale_by_trust_ratio(
    *, min_coeff: float = 0.0, max_coeff: float = math.inf
) -> GradientTransformation:
    r"""Scale each parameter's update by its layer-wise trust ratio (LAMB).

    .. math::
        r = \begin{cases}
        \operatorname{clip}\!\left(\frac{\lVert p\rVert}{\lVert u\rVert},
        c_{\min}, c_{\max}\right) & \lVert p\rVert > 0 \text{ and } \lVert u\rVert > 0 \\
        1 & \text{otherwise}\end{cases},\qquad u \leftarrow r\,u

    This is DeepSpeed ``FusedLamb``'s ``lamb_coeff`` (the clip is the paper's :math:`\phi`). Norms
    are per parameter. On ZeRO shards the per-parameter partial sums of squares of ``p`` and ``u``
    are stacked into one 1-D tensor and reduced with a single ``reduce_fn`` call (one collective,
    not one per parameter); parameters are ordered by sorted key, which every rank agrees on.

    Args:
        min_coeff: Lower clip of the ratio, >= 0.
        max_coeff: Upper clip of the ratio, >= ``min_coeff``.

    Returns:
        A stateless transform that needs ``params``.

    References:
        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
        2019 (Algorithm 2).

    Example:
        >>> import torch
        >>> tx = scale_by_trust_ratio()
        >>> p = {"w": torch.tensor([3.0, 4.0])}
        >>> tx.update({"w": torch.tensor([0.0, 0.5])}, tx.init(p), p)[0]["w"]
        tensor([0., 5.])
    """
    min_coeff = check_float("scale_by_trust_ratio", "min_coeff", min_coeff, low=0.0)
    max_coeff = check_float("scale_by_trust_ratio", "max_coeff", max_coeff, low=min_coeff)

    def init_fn(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]:
        params = require_params(params, "scale_by_trust_ratio")
        keys = sorted(updates)
        ratios = trust_ratios(
            [params[k] for k in keys],
            [updates[k] for k in keys],
            min_coeff=min_coeff,
            max_coeff=max_coeff,
            reduce_fn=extra.get("reduce_fn"),
        )
        return {k: updates[k] * ratios[i] for i, k in enumerate(keys)}, state

    return GradientTransformation(init_fn, update_fn)


def trust_ratios(
    params: list[Tensor],
    updates: list[Tensor],
    *,
    min_coeff: float,
    max_coeff: float,
    reduce_fn: ReduceFn | None,
) -> Tensor:
    """Per-parameter LAMB trust ratios as one 1-D tensor, with a single ``reduce_fn`` call."""
    n = len(params)
    sq = torch.cat([sum_squares(params), sum_squares(updates)])
    if n:
        sq = sq.to(updates[0].device)
    norms = reduce(sq, reduce_fn).sqrt()
    p_norm, u_norm = norms[:n], norms[n:]
    ratio = torch.clamp(p_norm / u_norm, min=min_coeff, max=max_coeff)
    # DeepSpeed falls back to 1 when either norm is zero (a zero-initialised bias, or a zero
    # update); where() also discards the 0/0 = nan computed for those entries.
    return torch.where((p_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
