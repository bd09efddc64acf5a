"""Reading a step's metrics on the host: the one synchronisation point of a training loop.

Example:
    >>> import torch
    >>> read_metrics({"loss": torch.tensor(2.5), "skipped": torch.tensor(0)}, step=10)
    {'loss': 2.5, 'skipped': 0.0}
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

__all__ = ["LossScaleAtMinimumError", "read_metrics"]


class LossScaleAtMinimumError(RuntimeError):
    """fp16 gradients overflowed with the loss scale already at ``min_loss_scale``."""


def read_metrics(
    metrics: Mapping[str, object], *, step: int, raise_at_min_scale: bool = False
) -> dict[str, float]:
    """Copy 0-d tensor metrics to Python floats (one sync) and report anomalies.

    Warns when the step was skipped for non-finite gradients, and loudly when an fp16 overflow
    hit the minimum loss scale (training goes on, as the scale cannot shrink further); raises
    :class:`LossScaleAtMinimumError` instead when ``raise_at_min_scale`` (config key
    ``funczero.raise_at_min_loss_scale``).
    """
    values = [v for v in metrics.values() if isinstance(v, torch.Tensor) and v.dim() == 0]
    host = torch.stack([v.detach().float().cpu() for v in values]).tolist() if values else []
    out: dict[str, float] = {}
    it = iter(host)
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            out[k] = next(it)
    if out.get("overflow_at_min_scale"):
        msg = (
            f"step {step}: fp16 gradients overflowed with the loss scale at its minimum "
            f"({out.get('loss_scale')}); the step was skipped and the scale cannot shrink. "
            "Lower the learning rate, use bf16, or lower fp16.min_loss_scale"
        )
        if raise_at_min_scale:
            raise LossScaleAtMinimumError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    elif out.get("skipped"):
        warnings.warn(
            f"step {step}: gradients were not finite; the update was skipped "
            f"(loss scale {out.get('loss_scale')})",
            RuntimeWarning,
            stacklevel=2,
        )
    return out
