"""DeepSpeed's dynamic loss scaler as pure tensor functions.

The state is a :class:`LossScaleState` of 0-d tensors, so it lives in the train-state pytree and
in checkpoints (DeepSpeed pickles the scaler object instead), and :func:`update_loss_scale` is
branch-free ``torch.where`` arithmetic: no ``.item()``, no host sync, safe inside a compiled or
CUDA-graphed step.

The update rule is DeepSpeed's ``DynamicLossScaler.update_scale`` (ZeRO path, v0.19):

* on overflow, if hysteresis is used up (``hysteresis == 1`` configured, or one overflow left),
  the scale becomes ``max(scale / 2, min_scale)``; otherwise one unit of hysteresis is used
  and the scale is kept. Either way the overflow iteration is remembered;
* without overflow, ``consecutive_hysteresis`` refills hysteresis; and when
  ``stable = cur_iter - last_overflow_iter - 1`` is a positive multiple of ``scale_window`` the
  scale doubles (refilling hysteresis when not consecutive);
* ``cur_iter`` always advances.

Where funczero differs from DeepSpeed (each on purpose):

1. **Which scale unscales the gradients.** DeepSpeed's fp16 optimizers update the scale
   *before* unscaling, so on a growth step gradients made with scale ``S`` are divided by
   ``2S`` (the step is applied at half size and clipping sees half the norm). funczero's step
   unscales with ``state.scale`` -- the scale that produced the gradients -- and calls
   :func:`update_loss_scale` afterwards.
2. **One scaler everywhere.** DeepSpeed applies hysteresis only with ZeRO 1-3; its no-ZeRO fp16
   optimizers halve on every overflow. funczero uses the rule above at every ZeRO stage.
3. **At the minimum scale.** DeepSpeed's ZeRO path raises ("Current loss scale already at
   minimum") on an overflow at ``min_scale`` with hysteresis used up; the no-ZeRO path skips
   forever. funczero cannot raise inside the step (that would need a host sync): the scale
   stays at ``min_scale``, :func:`at_min_scale` tells the logger, which warns or, with
   ``raise_at_min_scale`` (config ``funczero.raise_at_min_loss_scale``), raises at log time.
4. **Upper bound.** DeepSpeed's Python-float scale grows without bound; ours is float32, so
   growth stops at ``2**127`` (:data:`MAX_SCALE`) instead of becoming ``inf``. A scale that large
   already overflows any non-zero fp16 gradient, so this only matters when gradients are zero.

Example:
    >>> import torch
    >>> cfg = LossScaleConfig(init_scale=2.0**16, scale_window=2, hysteresis=1)
    >>> state = init_loss_scale(cfg)
    >>> for overflow in [True, False, False, False]:
    ...     state = update_loss_scale(state, torch.tensor(overflow), cfg)
    >>> state.scale
    tensor(65536.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch

__all__ = [
    "MAX_SCALE",
    "LossScaleConfig",
    "LossScaleState",
    "at_min_scale",
    "init_loss_scale",
    "update_loss_scale",
]

MAX_SCALE = 2.0**127
"""The largest scale :func:`update_loss_scale` grows to (the largest power of two in float32)."""


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    """Static settings of the loss scaler (the mutable part is :class:`LossScaleState`).

    Attributes:
        dynamic: adapt the scale (DeepSpeed ``fp16.loss_scale == 0``); otherwise it is constant.
        init_scale: the first scale (``2**initial_scale_power``, or the static ``loss_scale``).
        scale_window: consecutive non-overflow steps before the scale grows.
        hysteresis: overflows absorbed before the scale shrinks (DeepSpeed's ``delayed_shift``).
        consecutive_hysteresis: refill hysteresis after every non-overflow step.
        min_scale: the scale never shrinks below this.
        scale_factor: growth and shrink factor (fixed at 2 in DeepSpeed).
        raise_at_min_scale: ask the caller to raise when an overflow arrives with the scale at
            its minimum and hysteresis used up (DeepSpeed's ZeRO behaviour). The scaler itself
            never raises; see :func:`at_min_scale`.

    Example:
        >>> LossScaleConfig.disabled().init_scale
        1.0
    """

    dynamic: bool = True
    init_scale: float = 2.0**16
    scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_scale: float = 1.0
    scale_factor: float = 2.0
    raise_at_min_scale: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, want: str, fix: str) -> ValueError:
            return ValueError(
                f"LossScaleConfig.{name}: expected {want}, got {getattr(self, name)!r}; {fix}"
            )

        if not (math.isfinite(self.init_scale) and 0 < self.init_scale <= MAX_SCALE):
            raise bad("init_scale", "a number in (0, 2**127]", "e.g. 2**16")
        if not self.dynamic:
            return
        if isinstance(self.scale_window, bool) or not (
            isinstance(self.scale_window, int) and self.scale_window >= 1
        ):
            raise bad("scale_window", "an integer >= 1", "DeepSpeed's default is 1000")
        if isinstance(self.hysteresis, bool) or not (
            isinstance(self.hysteresis, int) and self.hysteresis >= 1
        ):
            raise bad(
                "hysteresis", "an integer >= 1",
                "1 shrinks on every overflow (0 would never shrink in DeepSpeed)",
            )
        if not (math.isfinite(self.min_scale) and self.min_scale > 0):
            raise bad("min_scale", "a finite number > 0", "DeepSpeed's default is 1")
        if self.init_scale < self.min_scale:
            raise bad("init_scale", f">= min_scale ({self.min_scale:g})", "raise it")
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 1):
            raise bad("scale_factor", "a finite number > 1", "DeepSpeed uses 2")

    @classmethod
    def from_fp16(cls, fp16: Any, *, raise_at_min_scale: bool = False) -> LossScaleConfig:
        """Build from a DeepSpeed ``fp16`` block (:class:`funczero.config.FP16Config`).

        Returns :meth:`disabled` when ``fp16.enabled`` is false, a static scale when
        ``fp16.loss_scale > 0``, and dynamic scaling otherwise.

        Example:
            >>> from funczero.config import FP16Config
            >>> LossScaleConfig.from_fp16(FP16Config(enabled=True, hysteresis=4)).hysteresis
            4
        """
        if not fp16.enabled:
            return cls.disabled()
        if fp16.loss_scale > 0:
            return cls(dynamic=False, init_scale=float(fp16.loss_scale))
        return cls(
            dynamic=True,
            init_scale=2.0 ** int(fp16.initial_scale_power),
            scale_window=int(fp16.loss_scale_window),
            hysteresis=int(fp16.hysteresis),
            consecutive_hysteresis=bool(fp16.consecutive_hysteresis),
            min_scale=float(fp16.min_loss_scale),
            raise_at_min_scale=raise_at_min_scale,
        )

    @classmethod
    def disabled(cls) -> LossScaleConfig:
        """A constant scale of 1 (fp32 and bf16 training)."""
        return cls(dynamic=False, init_scale=1.0)


class LossScaleState(NamedTuple):
    """The mutable scaler state, exactly DeepSpeed's ``DynamicLossScaler`` counters, as 0-d tensors.

    Attributes:
        scale: current loss scale (float32; DeepSpeed's ``cur_scale``).
        cur_iter: number of updates so far (int64).
        last_overflow_iter: ``cur_iter`` of the last overflow, -1 if none (int64).
        hysteresis_left: overflows still absorbed before shrinking (int64; ``cur_hysteresis``).
    """

    scale: torch.Tensor
    cur_iter: torch.Tensor
    last_overflow_iter: torch.Tensor
    hysteresis_left: torch.Tensor


def init_loss_scale(
    cfg: LossScaleConfig, device: torch.device | str | None = None
) -> LossScaleState:
    """Return the initial state for ``cfg``.

    Example:
        >>> init_loss_scale(LossScaleConfig()).scale
        tensor(65536.)
    """

    def i64(v: int) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int64, device=device)

    return LossScaleState(
        scale=torch.tensor(cfg.init_scale, dtype=torch.float32, device=device),
        cur_iter=i64(0),
        last_overflow_iter=i64(-1),
        hysteresis_left=i64(cfg.hysteresis),
    )


def update_loss_scale(
    state: LossScaleState, found_inf: torch.Tensor, cfg: LossScaleConfig
) -> LossScaleState:
    """Advance the scaler by one optimizer step, DeepSpeed's rule without host syncs.

    Call it after the step has unscaled its gradients with ``state.scale`` (see the module
    docstring for why the order matters).

    Args:
        state: the state whose ``scale`` produced this step's gradients.
        found_inf: 0-d bool (or numeric, non-zero meaning true) tensor: some gradient on some
            rank was inf/nan. Must already be reduced across ranks.
        cfg: the scaler settings. A static config returns ``state`` unchanged.

    Returns:
        The next state.

    Example:
        >>> import torch
        >>> cfg = LossScaleConfig(init_scale=8.0, hysteresis=2)
        >>> s = init_loss_scale(cfg)
        >>> s = update_loss_scale(s, torch.tensor(True), cfg)  # uses hysteresis, keeps the scale
        >>> s.scale, s.hysteresis_left
        (tensor(8.), tensor(1))
        >>> update_loss_scale(s, torch.tensor(True), cfg).scale  # then halves
        tensor(4.)
    """
    if not cfg.dynamic:
        return state
    scale, cur_iter, last_overflow, hyst = state
    overflow = found_inf.to(device=scale.device, dtype=torch.bool).reshape(())
    refill = torch.full_like(hyst, cfg.hysteresis)

    # Overflow: shrink once hysteresis is used up (hysteresis == 1 means "always used up").
    shrink = overflow & (hyst <= 1)
    shrunk = torch.clamp(scale / cfg.scale_factor, min=cfg.min_scale)
    hyst_after_overflow = torch.where(shrink, hyst, hyst - 1)

    # No overflow: grow on positive multiples of the window since the last overflow.
    stable = cur_iter - last_overflow - 1
    grow = ~overflow & (stable > 0) & (stable % cfg.scale_window == 0)
    grown = torch.clamp(scale * cfg.scale_factor, max=MAX_SCALE)
    if cfg.consecutive_hysteresis:
        hyst_after_clean = refill
    else:
        hyst_after_clean = torch.where(grow, refill, hyst)

    return LossScaleState(
        scale=torch.where(shrink, shrunk, torch.where(grow, grown, scale)),
        cur_iter=cur_iter + 1,
        last_overflow_iter=torch.where(overflow, cur_iter, last_overflow),
        hysteresis_left=torch.where(overflow, hyst_after_overflow, hyst_after_clean),
    )


def at_min_scale(state: LossScaleState, cfg: LossScaleConfig) -> torch.Tensor:
    """Whether the next overflow cannot lower the scale: it is at ``min_scale``, hysteresis used up.

    An overflowing step taken from such a state is exactly where DeepSpeed's ZeRO path raises.
    The caller evaluates ``found_inf & at_min_scale(state_before_step, cfg)`` when it logs, and
    warns (or raises when ``cfg.raise_at_min_scale``). Always false for a static scale.

    Returns:
        A 0-d bool tensor on the state's device (no host sync).

    Example:
        >>> cfg = LossScaleConfig(init_scale=1.0, min_scale=1.0, hysteresis=1)
        >>> at_min_scale(init_loss_scale(cfg), cfg)
        tensor(True)
    """
    if not cfg.dynamic:
        return torch.zeros((), dtype=torch.bool, device=state.scale.device)
    return (state.scale <= cfg.min_scale) & (state.hysteresis_left <= 1)
