"""Peak memory while building a training state: a meta-device model created module by module
(``funczero.init_state`` without full parameters) against building the model first.

Run (one GPU or the CPU)::

    python benchmarks/init_memory.py --device cuda --stage 3     # the 1.34B GPT
    python benchmarks/init_memory.py --device cpu --tiny

Prints one JSON line per path: peak device memory allocated during init (``max_memory_allocated``
on CUDA), peak host RSS growth, the state's own bytes, and the largest module's bytes.
At world size 1 stage 3 holds the whole model; at world N a rank's state is ~1/N of it, and the
meta path's peak is that plus one module (here the embedding), the eager path's the full model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

import funczero  # noqa: E402
from funczero import optim  # noqa: E402
from funczero.models.gpt import GPT, GPTConfig  # noqa: E402
from funczero.module import extract_tensors, release_module_tensors  # noqa: E402
from funczero.parallel.plan import build_plan  # noqa: E402
from funczero.train.memory import memory_breakdown  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--paths", default="meta,eager")
    args = ap.parse_args()
    cfg = (GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layers=2, n_heads=4) if args.tiny else
           GPTConfig(vocab_size=32000, seq_len=2048, d_model=2048, n_layers=24, n_heads=16,
                     bias=False, tie_weights=False))  # fmt: skip
    device = torch.device(args.device)
    with torch.device("meta"):  # pay the one-time imports of the meta device context up front
        GPT(GPTConfig(vocab_size=8, seq_len=4, d_model=8, n_layers=1, n_heads=1))
    proc = psutil.Process()
    for path in args.paths.split(","):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rss0 = proc.memory_info().rss
        t0 = time.perf_counter()
        torch.manual_seed(0)
        opt = optim.adamw(1e-4, weight_decay=0.01)
        if path == "meta":
            with torch.device("meta"):
                model = GPT(cfg)
            plan = build_plan(model, stage=args.stage, precision="bf16", param_persistence_threshold=100_000)
            state = funczero.init_state(plan, opt, device=device)
        else:
            model = GPT(cfg, device=device)
            plan = build_plan(model, stage=args.stage, precision="bf16", param_persistence_threshold=100_000)
            params, buffers = extract_tensors(model, plan.spec)
            release_module_tensors(model)
            state = funczero.init_state(plan, opt, params, buffers, device=device)
            del params
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        largest = max(sum(p.numel() * 4 for p in m.parameters(recurse=False)) for m in model.modules())
        state_bytes = memory_breakdown(state, plan)["total"]
        print(json.dumps({
            "path": path, "stage": args.stage, "device": str(device), "params": plan.spec.numel(),
            "init_s": round(seconds, 2), "peak_device_GiB": peak and round(peak / 2**30, 3),
            "rss_growth_GiB": round((proc.memory_info().rss - rss0) / 2**30, 3),
            "state_GiB": round(state_bytes / 2**30, 3), "largest_module_fp32_GiB": round(largest / 2**30, 3),
        }), flush=True)
        del state, model, plan


if __name__ == "__main__":
    main()
