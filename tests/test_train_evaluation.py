"""Evaluation: a forward-only step at every stage, and the weights back in the module.

Reference: the training step's loss metric on the same state and batch (it is computed by the
same forward), and the original module's logits. fp32; exact on one rank, 1e-6 across ranks
(the all-reduced mean sums in another order).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import funczero
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.train.evaluation import bound_module, make_eval_step
from funczero.testing.distributed import run_distributed

CFG = GPTConfig(vocab_size=16, seq_len=8, d_model=16, n_layers=2, n_heads=2)


def _run(stage: int):
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = GPT(CFG)
    reference.load_state_dict(model.state_dict())
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage,
              "stage3_param_persistence_threshold": 20}, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}  # fmt: skip
    run = funczero.initialize(model, config, cross_entropy_loss, donate=False, device="cpu")
    return model, reference, run


def _worker(rank: int, world: int, out: str) -> None:
    res = {}
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, 16, (2, 8), generator=g)
    for stage in (0, 1, 2, 3):
        model, reference, run = _run(stage)
        metrics = make_eval_step(cross_entropy_loss, run.plan)(run.state, (x, x))
        _, train_metrics = run.train_step(run.state, (x, x))
        res[f"s{stage}/eval"] = metrics["loss"].reshape(1)
        res[f"s{stage}/train"] = train_metrics["loss"].reshape(1)
        with bound_module(run.plan, run.state) as bound:
            assert bound.head.weight is bound.wte.weight  # ties kept
            res[f"s{stage}/logits"] = bound(x).contiguous()
        res[f"s{stage}/reference"] = reference(x).detach().contiguous()
    if rank == 0:
        save_file(res, out)


@pytest.mark.parametrize("world", [1, 2])
def test_eval_step_and_bound_module_agree_with_training_and_the_original_module(world: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r.safetensors")
        if world == 1:
            _worker(0, 1, out)
        else:
            run_distributed(_worker, world, out, timeout=300)
        res = load_file(out)
    for stage in (0, 1, 2, 3):
        torch.testing.assert_close(res[f"s{stage}/eval"], res[f"s{stage}/train"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res[f"s{stage}/logits"], res[f"s{stage}/reference"], rtol=0, atol=0)


def test_calling_the_released_module_names_the_way_back() -> None:
    model, _, run = _run(3)
    with pytest.raises(RuntimeError, match="bound_module"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with bound_module(run.plan, run.state) as bound:
        assert bound(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 16)
    with pytest.raises(RuntimeError, match="make_eval_step"):
        model(torch.zeros(1, 4, dtype=torch.long))  # released again on exit


def test_full_state_dict_loads_strictly_into_a_fresh_module_at_stage_3() -> None:
    from funczero.train.evaluation import full_state_dict

    model, reference, run = _run(3)
    x = torch.randint(0, 16, (2, 8))
    state, _ = run.train_step(run.state, (x, x))
    fresh = GPT(CFG)
    fresh.load_state_dict(full_state_dict(run.plan, state), strict=True)  # the tied head too
    assert fresh.head.weight is fresh.wte.weight
    with bound_module(run.plan, state, dtype=torch.float32) as bound:
        torch.testing.assert_close(fresh(x), bound(x), rtol=0, atol=0)
