"""funczero.train.loss_scale against an independent plain-Python model of DeepSpeed's scaler."""

from __future__ import annotations

import inspect
import io
import math
import random
import re
import tokenize

import pytest
import torch

import funczero.train.loss_scale as ls
from funczero.config import FP16Config
from funczero.train.loss_scale import (
    MAX_SCALE,
    LossScaleConfig,
    at_min_scale,
    init_loss_scale,
    update_loss_scale,
)


class DeepSpeedScaler:
    """DeepSpeed's ``DynamicLossScaler.update_scale`` (v0.19, ZeRO path) written out plainly.

    ``raises`` counts the overflows where DeepSpeed would raise at the minimum scale (with
    ``raise_error_at_min_scale=True``); the model then behaves as if it had not raised, which is
    what funczero does. ``max_scale`` models funczero's float32 cap (inf = DeepSpeed exactly).
    """

    def __init__(self, init_scale: float, window: int, min_scale: float, hysteresis: int,
                 consecutive: bool, max_scale: float = math.inf) -> None:
        self.cur_scale = init_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = 2.0
        self.scale_window = window
        self.min_scale = min_scale
        self.delayed_shift = hysteresis
        self.cur_hysteresis = hysteresis
        self.consecutive_hysteresis = consecutive
        self.max_scale = max_scale
        self.raises = 0

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale:
                    self.raises += 1
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable_interval = (self.cur_iter - self.last_overflow_iter) - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale = min(self.cur_scale * self.scale_factor, self.max_scale)
        self.cur_iter += 1


def _run_both(cfg: LossScaleConfig, overflows: list[bool], max_scale: float = MAX_SCALE) -> None:
    ref = DeepSpeedScaler(cfg.init_scale, cfg.scale_window, cfg.min_scale, cfg.hysteresis,
                          cfg.consecutive_hysteresis, max_scale)
    state = init_loss_scale(cfg)
    flags = torch.tensor(overflows)
    for step, overflow in enumerate(overflows):
        would_raise = bool(flags[step] & at_min_scale(state, cfg))
        state = update_loss_scale(state, flags[step], cfg)
        raises_before = ref.raises
        ref.update_scale(overflow)
        assert would_raise == (ref.raises > raises_before), f"at_min_scale wrong at step {step}"
        got = (state.scale.item(), state.cur_iter.item(), state.last_overflow_iter.item(),
               state.hysteresis_left.item())
        want = (ref.cur_scale, ref.cur_iter, ref.last_overflow_iter, ref.cur_hysteresis)
        assert got == want, f"step {step} (overflow={overflow}): got {got}, DeepSpeed {want}"


CONFIGS = [
    # (window, hysteresis, consecutive, min_scale, initial power, overflow probability)
    (1, 1, False, 1.0, 4, 0.5),
    (3, 2, False, 1.0, 6, 0.3),
    (3, 2, True, 1.0, 6, 0.3),
    (5, 3, False, 0.25, 3, 0.4),
    (5, 3, True, 0.25, 3, 0.4),
    (7, 1, True, 2.0, 8, 0.2),
    (10, 4, False, 1.0, 16, 0.1),
    (2, 5, True, 1.0, 2, 0.6),
]


@pytest.mark.parametrize(("window", "hyst", "consecutive", "min_scale", "power", "p"), CONFIGS)
def test_matches_deepspeed_on_random_sequences(
    window: int, hyst: int, consecutive: bool, min_scale: float, power: int, p: float
) -> None:
    rng = random.Random(window * 1000 + hyst * 10 + consecutive)
    cfg = LossScaleConfig(init_scale=2.0**power, scale_window=window, hysteresis=hyst,
                          consecutive_hysteresis=consecutive, min_scale=min_scale)
    for _ in range(3):
        # bursts of overflows and long clean runs both matter (hysteresis, growth windows)
        overflows: list[bool] = []
        while len(overflows) < 400:
            q = rng.choice([p, 0.0, 0.9])
            overflows += [rng.random() < q for _ in range(rng.randint(1, 40))]
        _run_both(cfg, overflows)


def test_matches_deepspeed_defaults_without_hitting_the_cap() -> None:
    cfg = LossScaleConfig.from_fp16(FP16Config(enabled=True, loss_scale_window=20))
    rng = random.Random(0)
    overflows = [rng.random() < 0.05 for _ in range(1500)]
    _run_both(cfg, overflows, max_scale=math.inf)  # DeepSpeed exactly: the cap is never reached


def test_first_growth_on_window_plus_first_clean_step() -> None:
    cfg = LossScaleConfig(init_scale=4.0, scale_window=3)
    state = init_loss_scale(cfg)
    scales = []
    for _ in range(5):
        state = update_loss_scale(state, torch.tensor(False), cfg)
        scales.append(state.scale.item())
    # stable = cur_iter - (-1) - 1 reaches 3 at cur_iter 3, the 4th clean step
    assert scales == [4.0, 4.0, 4.0, 8.0, 8.0]


def test_default_hysteresis_is_not_refilled_until_growth() -> None:
    cfg = LossScaleConfig.from_fp16(FP16Config(enabled=True))  # hysteresis 2, window 1000
    state = init_loss_scale(cfg)
    seq = [True, False, False, True, True]
    scales = []
    for overflow in seq:
        state = update_loss_scale(state, torch.tensor(overflow), cfg)
        scales.append(state.scale.item())
    assert scales == [65536.0, 65536.0, 65536.0, 32768.0, 16384.0]  # issue #931's log shape


def test_min_scale_clamps_and_is_reported() -> None:
    cfg = LossScaleConfig(init_scale=4.0, min_scale=1.0, hysteresis=1)
    state = init_loss_scale(cfg)
    for _ in range(5):
        state = update_loss_scale(state, torch.tensor(True), cfg)
    assert state.scale.item() == 1.0
    assert bool(at_min_scale(state, cfg))
    assert state.last_overflow_iter.item() == 4


def test_growth_stops_at_float32_cap() -> None:
    cfg = LossScaleConfig(init_scale=2.0**125, scale_window=1, hysteresis=1)
    state = init_loss_scale(cfg)
    for _ in range(10):
        state = update_loss_scale(state, torch.tensor(False), cfg)
    assert state.scale.item() == MAX_SCALE
    assert torch.isfinite(state.scale)


@pytest.mark.parametrize("cfg", [LossScaleConfig.disabled(), LossScaleConfig(False, 128.0)])
def test_static_scale_never_changes(cfg: LossScaleConfig) -> None:
    state = init_loss_scale(cfg)
    for overflow in [True, False] * 50 + [True] * 20:
        new = update_loss_scale(state, torch.tensor(overflow), cfg)
        assert new.scale.item() == cfg.init_scale
        state = new
    assert not bool(at_min_scale(state, cfg))


def test_from_fp16_maps_deepspeed_keys() -> None:
    fp16 = FP16Config(enabled=True, initial_scale_power=12, loss_scale_window=50,
                      hysteresis=3, consecutive_hysteresis=True, min_loss_scale=0.5)
    cfg = LossScaleConfig.from_fp16(fp16, raise_at_min_scale=True)
    assert cfg == LossScaleConfig(True, 4096.0, 50, 3, True, 0.5, 2.0, True)
    assert LossScaleConfig.from_fp16(FP16Config(enabled=True, loss_scale=128)).dynamic is False
    assert LossScaleConfig.from_fp16(FP16Config(enabled=False)) == LossScaleConfig.disabled()


def test_state_is_tensors_with_fixed_dtypes() -> None:
    cfg = LossScaleConfig()
    state = init_loss_scale(cfg)
    new = update_loss_scale(state, torch.tensor(1.0), cfg)  # numeric found_inf accepted
    for before, after in zip(state, new):
        assert isinstance(after, torch.Tensor) and after.dim() == 0
        assert after.dtype == before.dtype
    assert state.scale.dtype == torch.float32 and state.cur_iter.dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"scale_window": 0}, "scale_window"),
        ({"hysteresis": 0}, "hysteresis"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"init_scale": 0.5, "min_scale": 1.0}, "init_scale"),
        ({"init_scale": math.inf}, "init_scale"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        LossScaleConfig(**kwargs)  # type: ignore[arg-type]


def _code_only(obj: object) -> str:
    """Source without docstrings and comments (they may mention .item() in prose)."""
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(obj)).readline)
    return " ".join(t.string for t in tokens if t.type not in (tokenize.STRING, tokenize.COMMENT))


def test_module_never_syncs_with_the_host() -> None:
    assert not re.search(r"\.\s*(item|tolist|cpu|numpy)\s*\(", _code_only(ls))
    for fn in (update_loss_scale, at_min_scale, init_loss_scale):
        # a Python conversion of a tensor would also sync
        assert not re.search(r"\b(bool|float|int)\s*\(", _code_only(fn)), fn.__name__
