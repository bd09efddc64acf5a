"""ZeRO-Offload: GPU memory and throughput with the optimizer on the CPU (issue 11, item 2).

Trains funczero's GPT with and without optimizer offload at ZeRO stages 1-3, and DeepSpeed
ZeRO-Offload on the same model when ``import deepspeed`` works, each system in a fresh
subprocess (one GPU, world size 1), and prints one JSON line per system (also appended to
``--out``) and a table::

    python benchmarks/offload.py                         # the 1.34B GPT on the visible GPU
    python benchmarks/offload.py --systems fz2,fz2-off,ds2-off
    python benchmarks/offload.py --systems cpu-adam-fz,cpu-adam-ds --adam-params 1e9
    python benchmarks/offload.py --device cpu --tiny     # CI smoke test

Systems: ``fz1``..``fz3`` (funczero, optimizer on the GPU), ``fz1-off``..``fz3-off`` (funczero,
``offload_optimizer: {device: cpu, pin_memory: true}``), ``ds1-off``..``ds3-off`` (DeepSpeed with
the same config block; its ``DeepSpeedCPUAdam`` JIT-builds on first use), ``ds1``..``ds3``
(DeepSpeed without offload). ``cpu-adam-fz`` / ``cpu-adam-ds`` time one AdamW step on
``--adam-params`` fp32 CPU parameters: funczero's in-place AdamW (torch's fused CPU kernel) and
DeepSpeed's ``DeepSpeedCPUAdam``, each on torch's intra-op threads (``--threads``).

The model is issue 6's GPT (vocab 32000, d_model 2048, 24 layers, 16 heads, sequence 2048,
bias-free, untied head; 1.34B parameters), micro-batch ``--mbs``, bf16 compute, fp32 master
weights, AdamW lr 1e-4 weight decay 0.01, gradient clipping 1.0, one fixed random batch.

Timing: wall time per step with a device synchronisation after each step (an offloaded step
synchronises once anyway: the CPU update reads the gradients), median over ``--steps`` after
``--warmup``. ``resident_gib`` is the GPU memory allocated between steps (the state);
``peak_gib`` is ``torch.cuda.max_memory_allocated`` over the timed steps. The table adds, for
each offloaded row, the bytes per parameter it saves against the row without offload at the
same stage (AdamW's fp32 master, ``mu`` and ``nu`` are 12 bytes per parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an override wins

FZ = ("fz1", "fz1-off", "fz2", "fz2-off", "fz3", "fz3-off")
DS = ("ds1", "ds1-off", "ds2", "ds2-off", "ds3", "ds3-off")
ADAM = ("cpu-adam-fz", "cpu-adam-ds")
SYSTEMS = FZ + DS + ADAM
DEFAULT = ("fz1", "fz1-off", "fz2", "fz2-off", "fz3", "fz3-off", "ds2-off", "ds3-off", "cpu-adam-fz", "cpu-adam-ds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--systems", default=",".join(DEFAULT), help=f"comma list of {SYSTEMS}")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, 1+2 steps (smoke test)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--adam-params", type=float, default=2e8, help="parameters of the cpu-adam rows")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per system")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process's system
    args = ap.parse_args(argv)
    if args.tiny:
        args.vocab, args.d_model, args.layers, args.heads, args.seq, args.mbs = 256, 64, 2, 4, 32, 2
        args.warmup, args.steps, args.adam_params = 1, 2, 1e5
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {SYSTEMS}")
    return args


def model_and_batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Any]:
    from funczero.models.gpt import GPT, GPTConfig  # noqa: PLC0415

    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq, d_model=args.d_model,
                    n_layers=args.layers, n_heads=args.heads, dropout=0.0, bias=False, tie_weights=False)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg, device=device)
    g = torch.Generator().manual_seed(1000)
    tokens = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=g)
    return model, (tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device))


def loss_fn(model: Callable[..., Any], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


def ds_config(args: argparse.Namespace, stage: int, offload: bool) -> dict[str, Any]:
    """The DeepSpeed config both funczero and DeepSpeed run (``offload``: ZeRO-Offload)."""
    zero: dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": args.mbs, "gradient_accumulation_steps": 1,
        "bf16": {"enabled": args.device == "cuda"}, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "zero_optimization": zero, "steps_per_print": 10**9,
    }  # fmt: skip


def setup_funczero(args: argparse.Namespace, stage: int, offload: bool, device: torch.device) -> Callable[[], Any]:
    import funczero  # noqa: PLC0415

    model, batch = model_and_batch(args, device)
    run = funczero.initialize(model, ds_config(args, stage, offload), loss_fn, device=device)
    holder = {"state": run.state}

    def step() -> torch.Tensor:
        holder["state"], metrics = run.train_step(holder["state"], batch)
        return metrics["loss"]

    return step


def setup_deepspeed(args: argparse.Namespace, stage: int, offload: bool, device: torch.device) -> Callable[[], Any]:
    import deepspeed  # noqa: PLC0415  (optional)

    model, batch = model_and_batch(args, device)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(args, stage, offload))  # fmt: skip

    def step() -> torch.Tensor:
        loss = loss_fn(engine, batch)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def cpu_adam(args: argparse.Namespace, impl: str) -> dict[str, Any]:
    """Median ms of one AdamW step on ``--adam-params`` fp32 CPU parameters (16 tensors)."""
    n = int(args.adam_params)
    sizes = [n // 16] * 15 + [n - 15 * (n // 16)]
    torch.manual_seed(0)
    params = [torch.randn(k) for k in sizes]
    grads = [torch.randn(k) * 1e-3 for k in sizes]
    if impl == "cpu-adam-fz":
        from funczero import optim  # noqa: PLC0415

        opt = optim.adamw(1e-4, weight_decay=0.01)
        tensors = {str(i): p for i, p in enumerate(params)}
        g = {str(i): x for i, x in enumerate(grads)}
        holder = {"state": opt.init(tensors)}

        def step() -> None:
            holder["state"] = opt.update_(g, holder["state"], tensors)
    else:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415

        ps = [torch.nn.Parameter(p) for p in params]
        for p, x in zip(ps, grads):
            p.grad = x
        ds = DeepSpeedCPUAdam(ps, lr=1e-4, weight_decay=0.01, adamw_mode=True)

        def step() -> None:
            ds.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(times)
    return {"impl": impl, "adam_params_M": round(n / 1e6, 1), "threads": torch.get_num_threads(),
            "step_ms_median": round(ms, 2), "gparams_per_s": round(n / ms / 1e6, 3)}  # fmt: skip


def train(args: argparse.Namespace, name: str) -> dict[str, Any]:
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    stage, offload = int(name[2]), name.endswith("-off")
    setup = setup_funczero if name.startswith("fz") else setup_deepspeed
    t0 = time.perf_counter()
    step = setup(args, stage, offload, device)
    setup_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    resident = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    model, _ = model_and_batch(args, torch.device("meta"))
    n_params = sum(p.numel() for p in model.parameters())
    ms = statistics.median(times)
    return {
        "impl": name, "stage": stage, "offload": offload, "params_M": round(n_params / 1e6, 1),
        "step_ms_median": round(ms, 2), "tokens_per_s": round(args.mbs * args.seq / (ms / 1e3)),
        "resident_gib": round(resident, 3), "peak_gib": round(peak, 3), "loss": round(float(loss), 4),
        "setup_s": round(setup_s, 1), "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }  # fmt: skip


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    out = cpu_adam(args, args.one) if args.one in ADAM else train(args, args.one)
    print(json.dumps(out), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, timeout=300)
    return probe.returncode == 0


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; offloaded rows show the bytes per parameter saved against no offload."""
    base = {(r["impl"][:2], r["stage"]): r for r in rows if "stage" in r and not r["offload"]}
    lines = ["| system | step ms | tokens/s | resident GiB | peak GiB | saved B/param (resident, peak) | loss (no offload) |",
             "|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for r in rows:
        if "stage" not in r:
            continue
        saved, loss = "", f'{r["loss"]}'
        ref = base.get((r["impl"][:2], r["stage"]))
        if r["offload"] and ref is not None and r["params_M"]:
            n = r["params_M"] * 1e6
            saved = f'{(ref["resident_gib"] - r["resident_gib"]) * 2**30 / n:.1f}, {(ref["peak_gib"] - r["peak_gib"]) * 2**30 / n:.1f}'
            loss += f' ({ref["loss"]})'  # the trajectory check: same data, weights and steps
        lines.append(f'| {r["impl"]} | {r["step_ms_median"]} | {r["tokens_per_s"]} | {r["resident_gib"]} | {r["peak_gib"]} | {saved} | {loss} |')
    for r in rows:
        if "adam_params_M" in r:
            lines.append(f'| {r["impl"]} ({r["adam_params_M"]}M params, {r["threads"]} threads) | {r["step_ms_median"]} | | | | {r["gparams_per_s"]} Gparam/s | |')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:
        child(args)
        return
    needs_ds = [s for s in args.systems if s.startswith("ds") or s == "cpu-adam-ds"]
    if needs_ds and not deepspeed_importable():
        print(f"# deepspeed is not importable: skipping {needs_ds}", file=sys.stderr, flush=True)
        args.systems = [s for s in args.systems if s not in needs_ds]
    rows = []
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in args.systems:
        cmd = [sys.executable, __file__, *argv, "--one", name]
        env = {**os.environ, "MASTER_PORT": str(free_port())}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            print(f"# {name}: timed out after {args.timeout:.0f}s", file=sys.stderr, flush=True)
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"# {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        row = json.loads(lines[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(rows), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
