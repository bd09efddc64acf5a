"""Single-process step overhead on the CPU: funczero's ``train_step`` against an eager PyTorch loop.

Both sides train the same GPT (``funczero.models.gpt``) from the same initial weights on the same
batches with the same math: next-token cross-entropy computed in fp32, backward, global-norm
clipping at 1.0, AdamW (lr 2e-3, betas (0.9, 0.99), eps 1e-8, weight decay 0.1 on every
parameter). The eager loop is the idiomatic one::

    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = cross_entropy_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()                                # torch.optim.AdamW(fused=True) when the CPU has it
    opt.zero_grad(set_to_none=True)

and funczero runs ``make_train_step`` (ZeRO stage 0, ``donate=True``, ``precision="bf16"`` for
the bf16 rows: bf16 parameters computed from fp32 master weights, as autocast computes bf16
copies of fp32 parameters).

Timing follows the protocol of ``shared/reference/torch-func-feasibility.md`` for this noisy VM:
after warm-up steps, each round times ``--steps`` steps of each side *interleaved* (eager,
funczero, eager, ...; the side that goes first alternates by round) and takes each side's
median; the reported time is the best (lowest) median over ``--rounds`` rounds. Peak memory is
measured with :func:`funczero.train.memory.peak_allocated_bytes` around building the
trainable state (eager: a copy of the model and the optimizer; funczero: ``init_state``) and two
steps (``torch.optim`` creates its moments in the first), so it covers the weights, optimizer
state, gradients and activations of a steady-state step.

Run::

    python benchmarks/step_overhead.py                       # both sizes, fp32 and bf16
    python benchmarks/step_overhead.py --sizes default --precisions fp32 --rounds 2
    python benchmarks/step_overhead.py --json results.json   # also write the numbers

Results are recorded in ``docs/performance.md`` ("Single-process step overhead (CPU)").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from funczero import optim
from funczero.module import extract_tensors, release_module_tensors
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
from funczero.train.memory import peak_allocated_bytes
from funczero.parallel.plan import build_plan
from funczero.train.step import init_state, make_train_step

LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 2e-3, (0.9, 0.99), 1e-8, 0.1, 1.0

# "default": the 0.82M GPT (examples/train_gpt.py's former default, 65 characters) and a batch of 16
# sequences (examples/configs/fp32.json). "large": 25M parameters, as wide as GPT-2 small's
# half, with a batch that keeps a step near half a second on two cores.
SIZES: dict[str, tuple[GPTConfig, int]] = {
    "default": (GPTConfig(vocab_size=65, seq_len=128, d_model=128, n_layers=4, n_heads=4), 16),
    "large": (GPTConfig(vocab_size=65, seq_len=128, d_model=512, n_layers=8, n_heads=8), 4),
}


def _fused_adamw_available() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


@dataclasses.dataclass
class Side:
    """One implementation under test: ``step()`` runs one training step on the fixed batch."""

    name: str
    step: Callable[[], Any]
    times: list[float] = dataclasses.field(default_factory=list)


def eager_side(
    template: GPT, batch: tuple[torch.Tensor, torch.Tensor], bf16: bool, fused: bool
) -> tuple[Callable[[], Any], Callable[[], None]]:
    """Return ``(build, step)``: build a fresh model + optimizer, and step it."""
    held: dict[str, Any] = {}

    def build() -> None:
        model = copy.deepcopy(template)
        params = [p for p in model.parameters() if p.requires_grad]
        kind = {"fused": True} if fused else {"foreach": True}
        opt = torch.optim.AdamW(
            params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kind
        )
        held.update(model=model, params=params, opt=opt)

    def step() -> torch.Tensor:
        model, params, opt = held["model"], held["params"], held["opt"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = cross_entropy_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return build, step


def funczero_side(
    template: GPT, batch: tuple[torch.Tensor, torch.Tensor], bf16: bool
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Return ``(build, step)`` for funczero at ZeRO stage 0 with donation."""
    model = copy.deepcopy(template)
    plan = build_plan(model, stage=0, precision="bf16" if bf16 else "fp32")
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    train_step = make_train_step(cross_entropy_loss, opt, plan, gradient_clipping=CLIP)
    held: dict[str, Any] = {}

    def build() -> None:
        held["state"] = init_state(plan, opt, params, buffers)

    def step() -> torch.Tensor:
        held["state"], metrics = train_step(held["state"], batch)
        return metrics["loss"]

    return build, step


def measure(size: str, precision: str, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    cfg, rows = SIZES[size]
    bf16 = precision == "bf16"
    torch.manual_seed(0)
    template = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len), generator=g)
    batch = (x, torch.roll(x, -1, dims=1))
    fused = _fused_adamw_available()

    builders = {
        "eager": eager_side(template, batch, bf16, fused),
        "funczero": funczero_side(template, batch, bf16),
    }
    # Peak memory first, each side built inside the measured call (see module docstring). Two
    # steps: torch.optim creates its moments lazily in the first step, after that step's peak.
    peaks = {}
    for name, (build, step) in builders.items():
        _, peaks[name] = peak_allocated_bytes(lambda b=build, s=step: (b(), s(), s()))
    sides = []
    for name, (build, step) in builders.items():
        build()
        sides.append(Side(name, step))
    losses = {}
    for side in sides:
        for _ in range(warmup):
            losses[side.name] = float(side.step())
    best: dict[str, float] = {s.name: float("inf") for s in sides}
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        per_round: dict[str, list[float]] = {s.name: [] for s in sides}
        for _ in range(steps):
            for side in order:
                t0 = time.perf_counter()
                side.step()
                per_round[side.name].append(time.perf_counter() - t0)
        for name, ts in per_round.items():
            best[name] = min(best[name], statistics.median(ts))
    n_params = sum(p.numel() for p in template.parameters())
    return {
        "size": size,
        "precision": precision,
        "params": n_params,
        "batch": [rows, cfg.seq_len],
        "eager_optimizer": "AdamW(fused=True)" if fused else "AdamW(foreach=True)",
        "eager_ms": best["eager"] * 1e3,
        "funczero_ms": best["funczero"] * 1e3,
        "ratio": best["funczero"] / best["eager"],
        "eager_peak_mib": peaks["eager"] / 2**20,
        "funczero_peak_mib": peaks["funczero"] / 2**20,
        "memory_ratio": peaks["funczero"] / peaks["eager"],
        "loss_after_warmup": losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="default,large", help="comma-separated: default, large")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"{datetime.date.today().isoformat()}",
        flush=True,
    )
    print(
        f"{'size':8} {'prec':5} {'params':>7} {'eager ms':>9} {'funczero ms':>11} {'ratio':>6} "
        f"{'eager MiB':>9} {'fz MiB':>7} {'mem':>5}",
        flush=True,
    )
    results = []
    for size in args.sizes.split(","):
        for precision in args.precisions.split(","):
            r = measure(size, precision, args.rounds, args.steps, args.warmup)
            results.append(r)
            print(
                f"{size:8} {precision:5} {r['params'] / 1e6:6.2f}M {r['eager_ms']:9.1f} "
                f"{r['funczero_ms']:11.1f} {r['ratio']:6.3f} {r['eager_peak_mib']:9.1f} "
                f"{r['funczero_peak_mib']:7.1f} {r['memory_ratio']:5.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
