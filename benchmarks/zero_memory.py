"""Per-rank memory of ZeRO stages 0-3 at world sizes 1, 2 and 4 (gloo, CPU), as in docs/zero.md.

For each model, stage and world size it builds the state on every rank, runs one bf16 AdamW step
(clipping 1.0) and reports rank 0's :func:`funczero.train.memory.memory_breakdown` (held
bytes by category, after the step), the measured peak of building the state plus one step
(:func:`funczero.train.memory.peak_allocated_bytes`, so the peak includes the state,
gradients, activations and communication buffers) and DeepSpeed's model-state formula for the
same parameter count.

Models: ``example`` is the 0.82M GPT (``examples/train_gpt.py``'s former default; 65 characters,
d_model 128, 4 layers, seq 128; 0.82M parameters) with the example's micro-batch of 16;
``57M`` has d_model 768, 8 layers, vocabulary 256, seq 128 and a micro-batch of 2.

Run::

    python benchmarks/zero_memory.py                   # both models, worlds 1 2 4 (a few minutes)
    python benchmarks/zero_memory.py --models example --worlds 1,2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
from pathlib import Path

import torch

from funczero import optim
from funczero.module import extract_tensors, release_module_tensors
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.parallel.plan import ZeroPlan, build_plan
from funczero.train.memory import (
    deepspeed_model_state_bytes,
    memory_breakdown,
    peak_allocated_bytes,
)
from funczero.train.step import TrainStep, init_state, make_train_step
from funczero.testing.distributed import run_distributed

MODELS: dict[str, tuple[GPTConfig, int]] = {
    "example": (GPTConfig(vocab_size=65, seq_len=128, d_model=128, n_layers=4, n_heads=4), 16),
    "57M": (GPTConfig(vocab_size=256, seq_len=128, d_model=768, n_layers=8, n_heads=12), 2),
}


def _build_and_step(
    plan: ZeroPlan,
    opt: optim.Optimizer,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    step: TrainStep,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, int]:
    # Inside the profiled call, so the state is counted (see peak_allocated_bytes).
    state = init_state(plan, opt, params, buffers)
    state, _ = step(state, batch)
    return memory_breakdown(state, plan)


def _worker(rank: int, world: int, model_name: str, precision: str, out_dir: str) -> None:
    cfg, rows = MODELS[model_name]
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len), generator=g)
    batch = (x, torch.roll(x, -1, dims=1))
    rows_out = []
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = GPT(cfg)
        plan = build_plan(model, stage=stage, precision=precision)
        params, buffers = extract_tensors(model, plan.spec)
        release_module_tensors(model)
        opt = optim.adamw(2e-3, weight_decay=0.1)
        step = make_train_step(cross_entropy_loss, opt, plan, gradient_clipping=1.0)
        run = functools.partial(_build_and_step, plan, opt, params, buffers, step, batch)
        mem, peak = peak_allocated_bytes(run)
        psi = plan.spec.numel(trainable_only=True)
        rows_out.append(
            {
                "model": model_name,
                "world": world,
                "stage": stage,
                "psi": psi,
                **mem,
                "peak": peak,
                "deepspeed": deepspeed_model_state_bytes(psi, stage, world),
            }
        )
        del params, plan, step, model, run
    if rank == 0:
        Path(out_dir, f"{model_name}-{world}.json").write_text(json.dumps(rows_out))


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}" if x < 100 * 2**20 else f"{x / 2**20:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="example,57M")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--json", default=None, help="also write all rows here")
    args = ap.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for world in (int(w) for w in args.worlds.split(",")):
                run_distributed(_worker, world, name, args.precision, tmp, timeout=600)
                rows.extend(json.loads(Path(tmp, f"{name}-{world}.json").read_text()))
    print(
        "| model | N | stage | params | grads | master | opt_state | held total | "
        "DeepSpeed 16Ψ-formula | measured peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} ({r['psi'] / 1e6:.2f}M) | {r['world']} | {r['stage']} | "
            f"{_mib(r['params'])} | {_mib(r['grads'])} | {_mib(r['master'])} | "
            f"{_mib(r['opt_state'])} | {_mib(r['total'])} | {_mib(r['deepspeed'])} | "
            f"{_mib(r['peak'])} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
