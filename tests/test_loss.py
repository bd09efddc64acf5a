"""Token-weighted losses: padded, variable-length micro-batches on several ranks give the gradient
of one big batch of the real tokens.

Reference: plain autograd on a copy of the model, each sequence at its own length, the summed
token losses divided by the number of real tokens. SGD with lr 1 and no momentum makes the
update the gradient itself. Tolerance: fp32, different summation order (1e-6 relative).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import funczero
from funczero import MicroBatches, TokenLoss, optim
from funczero.models.gpt import GPT, GPTConfig
from funczero.module import extract_tensors, release_module_tensors
from funczero.parallel.plan import build_plan
from funczero.parallel.stages import gather_full
from funczero.testing.distributed import run_distributed

CFG = GPTConfig(vocab_size=20, seq_len=12, d_model=16, n_layers=2, n_heads=2)
PAD = -100


def sequences(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 20, (int(torch.randint(3, 13, (1,), generator=g)),), generator=g) for _ in range(n)]


def padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, padded to the longest; targets of padding are ignored."""
    width = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    y = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s) - 1], y[i, : len(s) - 1] = s[:-1], s[1:]
    return x, y


def token_loss(model, batch) -> TokenLoss:
    x, y = batch
    logits = model(x).float()
    total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=PAD, reduction="sum")
    return TokenLoss(total, (y != PAD).sum())


def reference_grads(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(CFG)
    total = sum(F.cross_entropy(model(s[None, :-1]).float()[0], s[1:], reduction="sum") for s in seqs)
    (total / sum(len(s) - 1 for s in seqs)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _worker(rank: int, world: int, out: str) -> None:
    seqs = sequences()
    per_rank = len(seqs) // world
    mine = seqs[rank * per_rank : (rank + 1) * per_rank]
    res = {}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = GPT(CFG)
        plan = build_plan(model, stage=stage)
        params, buffers = extract_tensors(model, plan.spec)
        release_module_tensors(model)
        opt = optim.sgd(1.0)
        state = funczero.init_state(plan, opt, params, buffers)
        before = gather_full(plan, state.master, sharded=plan.master_sharded)
        step = funczero.make_train_step(token_loss, opt, plan, grad_accum=2)
        half = len(mine) // 2  # two micro-batches of different widths
        state, metrics = step(state, MicroBatches([padded(mine[:half]), padded(mine[half:])]))
        after = gather_full(plan, state.master, sharded=plan.master_sharded)
        for n in before:
            res[f"s{stage}/{n}"] = (before[n] - after[n]).contiguous()
        res[f"s{stage}/loss"] = metrics["loss"].reshape(1)
    if rank == 0:
        save_file(res, out)


@pytest.mark.parametrize("world", [1, 2])
def test_token_weighted_padded_micro_batches_match_one_unpadded_batch(world: int) -> None:
    seqs = sequences()
    ref = reference_grads(seqs)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "g.safetensors")
        if world == 1:
            _worker(0, 1, out)
        else:
            run_distributed(_worker, world, out, timeout=300)
        got = load_file(out)
    for stage in (0, 1, 2, 3):
        for n, g in ref.items():
            if n == "head.weight":
                continue  # tied to wte.weight: one canonical gradient
            torch.testing.assert_close(got[f"s{stage}/{n}"], g, rtol=1e-5, atol=1e-6, msg=f"stage {stage} {n}")


def test_micro_batches_must_match_the_accumulation_steps() -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    plan = build_plan(model)
    params, buffers = extract_tensors(model, plan.spec)
    opt = optim.sgd(0.1)
    step = funczero.make_train_step(token_loss, opt, plan, grad_accum=2)
    state = funczero.init_state(plan, opt, params, buffers)
    with pytest.raises(ValueError, match="MicroBatches holds 3 micro-batches but gradient_accumulation_steps=2"):
        step(state, MicroBatches([padded(sequences(2))] * 3))


def test_mixing_token_and_mean_losses_is_an_error() -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    plan = build_plan(model)
    params, buffers = extract_tensors(model, plan.spec)
    opt = optim.sgd(0.1)
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        out = token_loss(m, b)
        return out if len(calls) == 1 else out.sum / out.count

    step = funczero.make_train_step(loss_fn, opt, plan, grad_accum=2, donate=False)
    state = funczero.init_state(plan, opt, params, buffers)
    with pytest.raises(TypeError, match="TokenLoss for some micro-batches"):
        step(state, MicroBatches([padded(sequences(2)), padded(sequences(2, seed=1))]))
