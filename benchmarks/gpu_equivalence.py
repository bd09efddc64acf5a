"""ZeRO stages 0-3 on N GPUs (NCCL) against 1 GPU and against eager PyTorch (issue 3, "On GPUs").

    python benchmarks/gpu_equivalence.py               # 2 GPUs vs 1 GPU
    python benchmarks/gpu_equivalence.py --world 4
    python benchmarks/gpu_equivalence.py --device cpu  # the same checks on gloo (no GPU)

For each stage, on two small GPTs (``padded``: the unit tests' sizes, where most parameters need
padding; ``small``: 4 blocks, d_model 128), the same global batch is split over the ranks and:

* fp32: the first step's gradients, the parameters after 5 SGD-momentum steps (2 micro-batches
  each, so stages 0-1 take the accumulate-then-reduce path), and the losses of 10 AdamW steps
  with clipping (1 micro-batch: every stage reduces during backward, overlapped);
* bf16: the losses of 10 AdamW steps.

Each N-GPU result is compared with the 1-GPU run of the same stage and with eager PyTorch on one
GPU (fp32; ``torch.optim``). Prints a table of maximum differences and, last, one JSON line with
the worst of each column and whether every check passed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parents[1]))

from funczero import optim  # noqa: E402
from funczero.module import extract_tensors, release_module_tensors  # noqa: E402
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss  # noqa: E402
from funczero.parallel.forward_backward import PrefetchOrder, forward_backward  # noqa: E402
from funczero.parallel.plan import build_plan  # noqa: E402
from funczero.parallel.stages import gather_full  # noqa: E402
from funczero.train.step import init_state, make_train_step  # noqa: E402

CONFIGS = {
    "padded": GPTConfig(vocab_size=61, seq_len=12, d_model=30, n_layers=2, n_heads=3),
    "small": GPTConfig(vocab_size=512, seq_len=64, d_model=128, n_layers=4, n_heads=4),
}
GLOBAL_BATCH = 8
SGD_STEPS = 5
ADAM_STEPS = 10
# Tolerances. fp32: reduction order differs between 1 and N ranks (and the kernels differ with the
# per-rank batch), ~1e-7 relative per op. bf16: N ranks vs 1 rank quantise differently.
TOL = {"grad_rel": 1e-5, "sgd_abs": 1e-5, "adam_loss_abs": 1e-4, "bf16_loss_abs": 3e-2}


def make_model(cfg: GPTConfig, device: torch.device) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg, device=device)
    model.wpe.weight.requires_grad_(False)  # a frozen parameter, as in the unit tests
    return model


def batches(cfg: GPTConfig, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_len), generator=g)
        y = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_len), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


def local(batch: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    per = GLOBAL_BATCH // world
    return tuple(t[rank * per : (rank + 1) * per] for t in batch)


def setup(cfg: GPTConfig, stage: int, precision: str, opt: optim.GradientTransformation, device: torch.device):
    model = make_model(cfg, device)
    plan = build_plan(model, stage=stage, precision=precision, param_persistence_threshold=40)
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    return plan, init_state(plan, opt, params, buffers, device=device)


def run_stages(rank: int, world: int, device: torch.device) -> dict[str, torch.Tensor]:
    res: dict[str, torch.Tensor] = {}
    for cname, cfg in CONFIGS.items():
        data = batches(cfg, ADAM_STEPS, device)
        for stage in (0, 1, 2, 3):
            key = f"{cname}/s{stage}"
            plan, state = setup(cfg, stage, "fp32", optim.sgd(0.1), device)
            fb = forward_backward(
                plan, cross_entropy_loss, state.params, state.master, state.buffers,
                local(data[0], rank, world), torch.tensor(1.0, device=device),
                single_micro_batch=False, order=PrefetchOrder(),
            )  # fmt: skip
            grads = {n: g.float() for n, g in fb.grads.items()}
            grads = grads if fb.reduced else plan.policy.reduce_grads(plan, grads)
            for n, g in gather_full(plan, grads, sharded=plan.master_sharded).items():
                res[f"{key}/grad/{n}"] = g.float().cpu()
            opt = optim.sgd(0.1, momentum=0.9)
            plan, state = setup(cfg, stage, "fp32", opt, device)
            step = make_train_step(cross_entropy_loss, opt, plan, grad_accum=2)
            for i in range(SGD_STEPS):
                state, _ = step(state, local(data[i], rank, world))
            for n, p in gather_full(plan, state.master, sharded=plan.master_sharded).items():
                res[f"{key}/sgd/{n}"] = p.cpu()
            for precision in ("fp32", "bf16"):
                opt = optim.adamw(1e-2, weight_decay=0.1)
                plan, state = setup(cfg, stage, precision, opt, device)
                step = make_train_step(cross_entropy_loss, opt, plan, gradient_clipping=1.0)
                losses = []
                for i in range(ADAM_STEPS):
                    state, metrics = step(state, local(data[i], rank, world))
                    losses.append(metrics["loss"])
                res[f"{key}/adam_{precision}"] = torch.stack(losses).cpu()
    return res


def eager_reference(device: torch.device) -> dict[str, torch.Tensor]:
    """Plain PyTorch on the full batch, one device, fp32."""
    from funczero.models.gpt import cross_entropy_loss as ce  # same loss as the stages

    ref: dict[str, torch.Tensor] = {}
    for cname, cfg in CONFIGS.items():
        data = batches(cfg, ADAM_STEPS, device)
        model = make_model(cfg, device)
        ce(model, data[0]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                ref[f"{cname}/grad/{n}"] = p.grad.cpu()
        model = make_model(cfg, device)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        for i in range(SGD_STEPS):
            opt.zero_grad()
            ce(model, data[i]).backward()
            opt.step()
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref[f"{cname}/sgd/{n}"] = p.detach().cpu()
        model = make_model(cfg, device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        losses = []
        for i in range(ADAM_STEPS):
            opt.zero_grad()
            loss = ce(model, data[i])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.detach())
        ref[f"{cname}/adam_fp32"] = torch.stack(losses).cpu()
    return ref


def worker(rank: int, world: int, port: int, device_kind: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device,
                                timeout=datetime.timedelta(minutes=5))  # fmt: skip
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    try:
        res = run_stages(rank, world, device)
        if rank == 0:
            torch.save(res, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(world: int, device_kind: str, out: str) -> dict[str, torch.Tensor]:
    import torch.multiprocessing as mp  # noqa: PLC0415

    mp.spawn(worker, args=(world, _free_port(), device_kind, out), nprocs=world, join=True)
    return torch.load(out)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def compare(got: dict, want: dict, want_prefix: str, got_prefix: str, cname: str) -> dict[str, float]:
    """Worst differences of ``got[got_prefix/...]`` against ``want[want_prefix/...]``."""
    d = {"grad_rel": 0.0, "sgd_abs": 0.0, "adam_loss_abs": 0.0, "bf16_loss_abs": float("nan")}
    for k, w in want.items():
        if not k.startswith(want_prefix + "/"):
            continue
        rest = k[len(want_prefix) + 1 :]
        g = got.get(f"{got_prefix}/{rest}")
        if rest.startswith("grad/") and g is not None:
            d["grad_rel"] = max(d["grad_rel"], _maxdiff(g, w) / max(w.abs().max().item(), 1e-30))
        elif rest.startswith("sgd/") and g is not None:
            d["sgd_abs"] = max(d["sgd_abs"], _maxdiff(g, w))
        elif rest == "adam_fp32":
            d["adam_loss_abs"] = _maxdiff(g, w)
        elif rest == "adam_bf16":
            d["bf16_loss_abs"] = _maxdiff(g, w)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"need {args.world} GPUs, see {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        one = spawn(1, args.device, os.path.join(tmp, "w1.pt"))
        many = spawn(args.world, args.device, os.path.join(tmp, f"w{args.world}.pt"))
    ref = eager_reference(torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu"))

    header = f"{'model':7} {'stage':>5} {'vs':>7} {'grad rel':>9} {'SGD abs':>9} {'AdamW loss':>10} {'bf16 loss':>9}"
    print(header)
    worst = {k: 0.0 for k in TOL}
    ok = True
    for cname in CONFIGS:
        for stage in range(4):
            p = f"{cname}/s{stage}"
            for label, want, wp in ((f"{args.world}v1", one, p), ("eager", ref, cname)):
                d = compare(many, want, wp, p, cname)
                if label == "eager":
                    d["bf16_loss_abs"] = float("nan")  # no bf16 eager reference
                print(f"{cname:7} {stage:>5} {label:>7} {d['grad_rel']:9.1e} {d['sgd_abs']:9.1e} "
                      f"{d['adam_loss_abs']:10.1e} {d['bf16_loss_abs']:9.1e}")  # fmt: skip
                for k, v in d.items():
                    if v == v:  # not nan
                        worst[k] = max(worst[k], v)
                        ok &= v <= TOL[k]
    print(json.dumps({
        "check": "gpu_equivalence", "world": args.world, "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "worst": {k: float(f"{v:.3g}") for k, v in worst.items()},
        "tolerance": TOL, "passed": bool(ok),
    }))  # fmt: skip
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
