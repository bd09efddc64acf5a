"""Time one AdamW step: fused ``update_``, pure ``update`` + ``apply_updates``, torch.optim.

Run: ``python benchmarks/optim_fused.py --numel 20e6 --tensors 48``. Protocol (this VM is noisy):
warm up, then interleave the variants, take the median of ``--steps`` steps per round and the best
of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from funczero import optim


def _params(numel: int, tensors: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    per = numel // tensors
    cols = 1024
    return {
        f"blocks.{i}.weight": torch.randn(per // cols, cols, generator=gen) * 0.02
        for i in range(tensors)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--numel", type=float, default=20e6)
    parser.add_argument("--tensors", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    base = _params(int(args.numel), args.tensors)
    grads = {k: torch.randn_like(v) * 1e-3 for k, v in base.items()}
    opt = optim.adamw(1e-3, weight_decay=0.1)

    fast_p = {k: v.clone() for k, v in base.items()}
    fast_s = opt.init(fast_p)
    pure = {"p": {k: v.clone() for k, v in base.items()}}
    pure["s"] = opt.init(pure["p"])
    ref_p = [v.clone().requires_grad_() for v in base.values()]
    for p, g in zip(ref_p, grads.values()):
        p.grad = g.clone()
    ref = torch.optim.AdamW(ref_p, lr=1e-3, weight_decay=0.1, foreach=True)

    def run_fast() -> None:
        nonlocal fast_s
        fast_s = opt.update_(grads, fast_s, fast_p)

    def run_pure() -> None:
        updates, pure["s"] = opt.update(grads, pure["s"], pure["p"])
        pure["p"] = optim.apply_updates(pure["p"], updates)

    def run_ref() -> None:
        ref.step()

    variants: dict[str, Callable[[], None]] = {
        "update_ (fused, in place)": run_fast,
        "update + apply_updates (pure)": run_pure,
        "torch.optim.AdamW(foreach=True)": run_ref,
    }
    for fn in variants.values():  # warm-up
        fn()
        fn()
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(best[name], statistics.median(times))
    n = sum(v.numel() for v in base.values())
    print(f"AdamW step, {n / 1e6:.1f}M fp32 params in {len(base)} tensors, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    ref_ms = best["torch.optim.AdamW(foreach=True)"] * 1e3
    for name, t in best.items():
        print(f"  {name:34s} {t * 1e3:8.1f} ms   ({ref_ms / (t * 1e3):.2f}x torch foreach)")


if __name__ == "__main__":
    main()
