"""Activation checkpointing at every stage, and models that recompute on their own.

Reference: the same plan without recompute. Non-reentrant checkpointing replays the RNG state and
recomputes the same CPU ops, so gradients and trajectories must be bit-identical.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file

import funczero
from funczero import optim
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.module import extract_tensors, release_module_tensors
from funczero.parallel.plan import build_plan
from funczero.parallel.stages import gather_full
from funczero.testing.distributed import run_distributed

CFG = GPTConfig(vocab_size=32, seq_len=16, d_model=32, n_layers=3, n_heads=2, dropout=0.1)
STEPS = 3


class SelfCheckpointingGPT(GPT):
    """Recomputes its blocks itself, as a Hugging Face model after ``gradient_checkpointing_enable()``."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.head(self.ln_f(x))


def _trajectory(rank: int, world: int, stage: int, remat, model_cls=GPT, accum: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = model_cls(CFG)
    # threshold 40: every block holds persistent (bias, norm) and sharded (weight) parameters
    plan = build_plan(model, stage=stage, precision="fp32", param_persistence_threshold=40, remat=remat)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.adamw(1e-2, weight_decay=0.1)
    state = funczero.init_state(plan, opt, params, buffers, seed=3)
    step = funczero.make_train_step(cross_entropy_loss, opt, plan, grad_accum=accum)
    g = torch.Generator().manual_seed(1)
    out = {}
    for i in range(STEPS):
        x = torch.randint(0, 32, (4 * world, 16), generator=g)
        y = torch.randint(0, 32, (4 * world, 16), generator=g)
        state, m = step(state, (x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]))
        out[f"loss{i}"] = m["loss"].reshape(1).clone()
        out[f"grad_norm{i}"] = m["grad_norm"].reshape(1).clone()
    for n, t in gather_full(plan, state.master, sharded=plan.master_sharded).items():
        out[f"master/{n}"] = t.contiguous()
    return out


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max {float((a[k] - b[k]).abs().max())})"


def test_plan_selects_remat_units_by_flag_interval_names_and_predicate() -> None:
    model = GPT(CFG)
    assert build_plan(model, remat=False).remat_units == frozenset()
    assert build_plan(model, remat=True).remat_units == {"blocks.0", "blocks.1", "blocks.2"}
    assert build_plan(model, remat=2).remat_units == {"blocks.0", "blocks.2"}
    assert build_plan(model, remat=["blocks.1"]).remat_units == {"blocks.1"}
    assert build_plan(model, remat=lambda u: u.endswith("2")).remat_units == {"blocks.2"}
    with pytest.raises(ValueError, match=r"\['head'\] are not units"):
        build_plan(model, remat=["head"])
    with pytest.raises(ValueError, match="remat=0"):
        build_plan(model, remat=0)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_remat_is_bit_identical_at_every_stage_on_one_rank(stage: int) -> None:
    reference = _trajectory(0, 1, stage, remat=False)
    _assert_identical(reference, _trajectory(0, 1, stage, remat=True), f"stage {stage} remat")
    _assert_identical(reference, _trajectory(0, 1, stage, remat=2), f"stage {stage} every 2nd unit")


def test_remat_with_accumulation_is_bit_identical_at_stages_0_and_1() -> None:
    for stage in (0, 1):
        reference = _trajectory(0, 1, stage, remat=False, accum=2)
        _assert_identical(reference, _trajectory(0, 1, stage, remat=True, accum=2), f"stage {stage}")


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_a_model_that_checkpoints_itself_trains_like_one_that_does_not(stage: int) -> None:
    reference = _trajectory(0, 1, stage, remat=False)
    _assert_identical(reference, _trajectory(0, 1, stage, remat=False, model_cls=SelfCheckpointingGPT), "self")


def _world_worker(rank: int, world: int, out: str) -> None:
    res = {}
    for stage in (0, 1, 2, 3):
        for name, kwargs in (("plain", {"remat": False}), ("remat", {"remat": True}),
                             ("self", {"remat": False, "model_cls": SelfCheckpointingGPT})):
            for k, v in _trajectory(rank, world, stage, **kwargs).items():
                res[f"s{stage}/{name}/{k}"] = v
    if rank == 0:
        save_file(res, out)


@pytest.mark.parametrize("world", [2, 4])
def test_remat_and_self_checkpointing_are_bit_identical_on_several_ranks(world: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "res.safetensors")
        run_distributed(_world_worker, world, out, timeout=600)
        res = load_file(out)
    for stage in (0, 1, 2, 3):
        plain = {k.split("/", 2)[2]: v for k, v in res.items() if k.startswith(f"s{stage}/plain/")}
        for variant in ("remat", "self"):
            other = {k.split("/", 2)[2]: v for k, v in res.items() if k.startswith(f"s{stage}/{variant}/")}
            _assert_identical(plain, other, f"world {world} stage {stage} {variant}")
