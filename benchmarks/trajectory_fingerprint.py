"""Trajectory fingerprint: a few steps of every stage, precision and accumulation at world 1 and 2.

For checking that a refactor changes nothing: run it on two trees and compare bit for bit::

    PYTHONPATH=old_tree python benchmarks/trajectory_fingerprint.py /tmp/old
    PYTHONPATH=.        python benchmarks/trajectory_fingerprint.py /tmp/new
    python benchmarks/trajectory_fingerprint.py --compare /tmp/old /tmp/new

It writes every loss, grad norm and final master weight (gathered) of stages 0-3 x fp32/bf16/fp16
x 1 or 2 micro-batches (with clipping, or a clip-then-AdamW chain), at world 1 and on 2 gloo ranks.
The imports fall back to the module names before the restructure of 2026-12-02.
"""
import sys
import torch
from safetensors.torch import save_file
import funczero
from funczero import optim
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss
try:
    from funczero.parallel.stages import gather_full
except ImportError:
    from funczero.parallel.zero import gather_full
try:
    from funczero.testing.distributed import run_distributed
except ImportError:
    from funczero.testing import run_distributed
try:
    from funczero.train.loss_scale import LossScaleConfig
except ImportError:
    from funczero.loss_scale import LossScaleConfig


def run(rank: int, world: int, out: str) -> None:
    res = {}
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16", "fp16"):
            for accum in (1, 2):
                torch.manual_seed(0)
                model = GPT(GPTConfig(vocab_size=32, seq_len=16, d_model=32, n_layers=2, n_heads=2))
                plan = funczero.build_plan(model, stage=stage, precision=precision, param_persistence_threshold=40)
                params, buffers = funczero.functional.extract_tensors(model, plan.spec)
                opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1)) if accum == 2 else optim.adamw(1e-2, weight_decay=0.1)
                ls = LossScaleConfig(dynamic=True, init_scale=2.0**8) if precision == "fp16" else None
                state = funczero.init_state(plan, opt, params, buffers, seed=1, loss_scale=ls)
                step = funczero.make_train_step(cross_entropy_loss, opt, plan, grad_accum=accum, gradient_clipping=0.5 if accum == 1 else 0.0, loss_scale=ls)
                g = torch.Generator().manual_seed(5)
                for i in range(4):
                    x = torch.randint(0, 32, (4 * world, 16), generator=g)
                    y = torch.randint(0, 32, (4 * world, 16), generator=g)
                    b = (x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4])
                    state, m = step(state, b)
                    res[f"s{stage}/{precision}/a{accum}/loss{i}"] = m["loss"].reshape(1).clone()
                    res[f"s{stage}/{precision}/a{accum}/gn{i}"] = m["grad_norm"].reshape(1).clone()
                for n, t in gather_full(plan, state.master, sharded=plan.master_sharded).items():
                    res[f"s{stage}/{precision}/a{accum}/master/{n}"] = t.float().contiguous()
    if rank == 0:
        save_file(res, out)


def compare(a: str, b: str) -> int:
    """Print, per world size, whether two fingerprints are bit-identical; 1 when not."""
    from safetensors.torch import load_file

    bad = 0
    for w in ("w1", "w2"):
        x, y = load_file(f"{a}.{w}.safetensors"), load_file(f"{b}.{w}.safetensors")
        if x.keys() != y.keys():
            print(w, "different keys:", sorted(set(x) ^ set(y))[:5])
            bad = 1
            continue
        diff = [k for k in x if not torch.equal(x[k], y[k])]
        print(w, len(x), "tensors:", "bit-identical" if not diff else f"{len(diff)} differ, e.g. {diff[:5]}")
        bad |= bool(diff)
    return bad


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    out = sys.argv[1]
    run(0, 1, out + ".w1.safetensors")
    run_distributed(run, 2, out + ".w2.safetensors", timeout=900)
