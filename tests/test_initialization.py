"""funczero.initialize: what it tells a user whose config does not do what it says."""

from __future__ import annotations

import warnings

import pytest
import torch

import funczero

CONFIG = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def _loss(model, batch):
    return model(batch).pow(2).mean()


def test_stage_3_that_shards_nothing_says_so() -> None:
    config = {**CONFIG, "zero_optimization": {"stage": 3}}  # default threshold 1e5: all kept
    with pytest.warns(UserWarning, match=r"stage 3 shards nothing.*threshold=100000"):
        run = funczero.initialize(torch.nn.Linear(4, 1), config, _loss, device="cpu")
    assert not any(run.plan.is_sharded(n) for n in run.plan.spec.params)


def test_stage_3_that_shards_is_quiet() -> None:
    config = {**CONFIG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run = funczero.initialize(torch.nn.Linear(4, 1), config, _loss, device="cpu")
    assert run.plan.is_sharded("weight")


def test_wall_clock_breakdown_gives_the_step_a_timer() -> None:
    run = funczero.initialize(torch.nn.Linear(4, 1), {**CONFIG, "wall_clock_breakdown": True}, _loss, device="cpu")
    state, _ = run.train_step(run.state, torch.ones(2, 4))
    assert set(run.timer.collect()) == {"forward", "backward", "reduce", "optimizer"}
