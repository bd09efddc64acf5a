"""Time one AdamW step: fused ``update_``, pure ``update`` + ``apply_updates``, torch.optim.

Run: ``python benchmarks/optim_fused.py --numel 20e6 --tensors 48 [--device cuda]``. Protocol
(shared machines are noisy): warm up, then interleave the variants, take the median of ``--steps``
steps per round and the best of ``--rounds`` rounds.

Variants: ``adamw(...).update_`` (fused, in place); ``chain(clip_by_global_norm(1.0),
adamw(...)).update_`` (clipping in place, then the fused kernel); the pure path; the generic
in-place path ``inplace_update(chain)``; and torch.optim.AdamW (foreach, and fused where it runs).
A variant the installed funczero lacks (an older checkout, for before/after runs) is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from funczero import optim


def _params(numel: int, tensors: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    per = numel // tensors
    cols = 1024
    return {
        f"blocks.{i}.weight": (torch.randn(per // cols, cols, generator=gen) * 0.02).to(device)
        for i in range(tensors)
    }


def _in_place(
    opt: optim.GradientTransformation,
    base: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    update_: Callable | None = None,
) -> Callable[[], None]:
    """One in-place step per call on its own copy of the parameters and state."""
    params = {k: v.clone() for k, v in base.items()}
    box = {"state": opt.init(params)}
    step = update_ if update_ is not None else opt.update_

    def run() -> None:
        box["state"] = step(grads, box["state"], params)

    return run


def _variants(
    base: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], device: torch.device
) -> dict[str, Callable[[], None]]:
    opt = optim.adamw(1e-3, weight_decay=0.1)
    clipped = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=0.1))
    pure = {"p": {k: v.clone() for k, v in base.items()}}
    pure["s"] = opt.init(pure["p"])

    def run_pure() -> None:
        updates, pure["s"] = opt.update(grads, pure["s"], pure["p"])
        pure["p"] = optim.apply_updates(pure["p"], updates)

    def torch_adamw(**kwargs: bool) -> Callable[[], None]:
        leaves = [v.clone().requires_grad_() for v in base.values()]
        for p, g in zip(leaves, grads.values()):
            p.grad = g.clone()
        return torch.optim.AdamW(leaves, lr=1e-3, weight_decay=0.1, **kwargs).step

    variants = {"adamw.update_ (fused, in place)": _in_place(opt, base, grads)}
    if getattr(clipped, "update_", None) is not None:
        variants["chain(clip, adamw).update_"] = _in_place(clipped, base, grads)
    variants["inplace_update(chain(clip, adamw))"] = _in_place(
        clipped, base, grads, optim.inplace_update(clipped)
    )
    variants["update + apply_updates (pure)"] = run_pure
    variants["torch.optim.AdamW(foreach=True)"] = torch_adamw(foreach=True)
    if device.type == "cuda":
        variants["torch.optim.AdamW(fused=True)"] = torch_adamw(fused=True)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--numel", type=float, default=20e6)
    parser.add_argument("--tensors", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    base = _params(int(args.numel), args.tensors, device)
    # Each step clips in place; the clipped gradients settle at norm 1 after the first call.
    grads = {k: torch.randn_like(v) * 1e-3 for k, v in base.items()}
    variants = _variants(base, grads, device)
    for fn in variants.values():  # warm-up
        fn()
        fn()
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times = []
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            best[name] = min(best[name], statistics.median(times))
    n = sum(v.numel() for v in base.values())
    print(f"AdamW step, {n / 1e6:.1f}M fp32 params in {len(base)} tensors on {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    ref_ms = best["torch.optim.AdamW(foreach=True)"] * 1e3
    for name, t in best.items():
        print(f"  {name:36s} {t * 1e3:8.2f} ms   ({ref_ms / (t * 1e3):.2f}x torch foreach)")


if __name__ == "__main__":
    main()
