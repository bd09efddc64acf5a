"""Host time per step: funczero's own Python work, measured where compute is negligible.

A GPT of 24 blocks with d_model 8 on the CPU does almost no arithmetic, so a step's time is the
host's time: unit boundaries, gathers, hooks, the optimizer's grouping, the step's bookkeeping.
This is what a GPU step pays on the host per unit; when it exceeds the GPU's time per unit the
GPU idles. Run it against another tree with ``PYTHONPATH`` to compare (issue 13, item 2)::

    python benchmarks/host_time.py --stages eager,fsdp2,0,3  # this tree, and PyTorch's loops
    PYTHONPATH=/path/to/old/tree python benchmarks/host_time.py --tag before

Prints one JSON line per stage: the minimum over ``--rounds`` rounds of the mean over
``--steps`` steps (the minimum filters out other processes' interference).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an override wins

import funczero  # noqa: E402
from funczero import optim  # noqa: E402
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss  # noqa: E402
from funczero.module import extract_tensors, release_module_tensors  # noqa: E402
from funczero.parallel.plan import build_plan  # noqa: E402
from funczero.train.step import init_state, make_train_step  # noqa: E402


def host_ms(stage: int, layers: int, steps: int, rounds: int) -> float:
    cfg = GPTConfig(vocab_size=32, seq_len=4, d_model=8, n_layers=layers, n_heads=2, bias=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    plan = build_plan(model, stage=stage, precision="bf16", param_persistence_threshold=0)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.adamw(1e-3)
    state = init_state(plan, opt, params, buffers)
    step = make_train_step(cross_entropy_loss, opt, plan)
    batch = (torch.randint(0, 32, (1, 4)), torch.randint(0, 32, (1, 4)))
    for _ in range(5):
        state, _ = step(state, batch)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            state, _ = step(state, batch)
        best = min(best, (time.perf_counter() - t) / steps * 1e3)
    return best


def eager_host_ms(layers: int, steps: int, rounds: int, fsdp2: bool = False) -> float:
    """The same model and batch in a plain PyTorch loop (autocast bf16, foreach AdamW), or
    with ``fsdp2``, FSDP2 (every block and the root sharded, bf16 parameters) on one gloo rank."""
    cfg = GPTConfig(vocab_size=32, seq_len=4, d_model=8, n_layers=layers, n_heads=2, bias=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    if fsdp2:
        import torch.distributed as dist  # noqa: PLC0415
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

        from funczero.testing.distributed import free_port  # noqa: PLC0415

        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

        mesh = init_device_mesh("cpu", (1,))  # on the CPU even where CUDA exists
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    batch = (torch.randint(0, 32, (1, 4)), torch.randint(0, 32, (1, 4)))

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=not fsdp2):
            loss = cross_entropy_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t) / steps * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="0,3", help="comma list of ZeRO stages, 'eager', 'fsdp2'")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for stage in args.stages.split(","):
        if stage in ("eager", "fsdp2"):
            ms = eager_host_ms(args.layers, args.steps, args.rounds, fsdp2=stage == "fsdp2")
        else:
            ms = host_ms(int(stage), args.layers, args.steps, args.rounds)
        print(json.dumps({
            "stage": stage, "layers": args.layers, "host_ms_per_step": round(ms, 3),
            "host_ms_per_unit": round(ms / args.layers, 4), "tag": args.tag,
            "funczero_src": str(Path(funczero.__file__).resolve().parent), "torch": torch.__version__,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
