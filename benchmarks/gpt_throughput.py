"""GPT training throughput and memory: funczero ZeRO 0-3, DDP and FSDP2 side by side (issue 6).

One invocation runs every system on the same processes, one after another, freeing memory in
between, and prints one JSON line per system (rank 0; also appended to ``--out``)::

    python benchmarks/gpt_throughput.py                       # every visible GPU, the 1.34B GPT
    torchrun --nproc_per_node 2 benchmarks/gpt_throughput.py  # same, launched by torchrun
    python benchmarks/gpt_throughput.py --device cpu --tiny   # CI smoke test: 2 gloo processes

The model is issue 6's GPT (vocab 32000, d_model 2048, 24 layers, 16 heads, sequence 2048,
bias-free, untied head, no dropout; 1.34B parameters), micro-batch 4 per GPU, one micro-step per
step, bf16, AdamW lr 1e-4 (weight decay 0.01, torch's default), loss in fp32. Each system trains
on one fixed random batch per rank (the loss is a sanity check, not a convergence result).

* ``funczero-z0`` .. ``funczero-z3``: :func:`funczero.make_train_step` on the ZeRO plan of that
  stage, bf16 compute, fp32 master weights, fp32 gradient reduction (``--reduce-dtype``),
  fused in-place AdamW, ``stage3_param_persistence_threshold`` 1e5 (DeepSpeed's default).
* ``ddp``: ``DistributedDataParallel`` on fp32 parameters under ``torch.autocast(bf16)``,
  ``torch.optim.AdamW`` with its defaults.
* ``fsdp2``: ``fully_shard`` on every block and the root, ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``, ``torch.optim.AdamW`` with its defaults.
* ``ds1``/``ds2``/``ds3``: DeepSpeed ZeRO 1-3 with bf16, when ``deepspeed`` is importable.

Timing: CUDA events around each step on the compute stream, no host sync between steps (the
steps run back to back as in training); median and minimum over ``--steps`` steps after
``--warmup``. FLOPs per token = 6N + 12 * layers * d_model * seq (N counts every parameter);
MFU is against 989 TFLOP/s (H100/H200 dense bf16). Peak memory is
``torch.cuda.max_memory_allocated`` over the warm-up and timed steps (reset after set-up), the
maximum over ranks. funczero lines also report ``host_syncs``: synchronising calls seen by
``torch.cuda.set_sync_debug_mode`` during one extra step (0 expected).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an override wins

import funczero  # noqa: E402
from funczero import optim  # noqa: E402
from funczero.module import extract_tensors, release_module_tensors  # noqa: E402
from funczero.models.gpt import GPT, GPTConfig, cross_entropy_loss  # noqa: E402
from funczero.parallel.plan import build_plan  # noqa: E402
from funczero.parallel.precision import Precision  # noqa: E402
from funczero.train.step import init_state, make_train_step  # noqa: E402

PEAK_TFLOPS = 989.0
BASE_SYSTEMS = ("funczero-z0", "funczero-z1", "funczero-z2", "funczero-z3", "eager", "ddp", "fsdp2", "ds1", "ds2", "ds3")
ALL_SYSTEMS = ("funczero-z0", "funczero-z1", "funczero-z2", "funczero-z3", "ddp", "fsdp2", "ds1", "ds2", "ds3")
# Variants: "-remat" (activation checkpointing per block), "-c" (each block torch.compile'd; for
# funczero through make_train_step(compile=True)); e.g. "funczero-z3-remat-c", "fsdp2-c", "eager-c".
COMPILABLE = ("funczero-z0", "funczero-z1", "funczero-z2", "funczero-z3", "eager", "ddp", "fsdp2")
ALIASES = {f"z{s}": f"funczero-z{s}" for s in range(4)} | {f"fz{s}": f"funczero-z{s}" for s in range(4)}


def split_system(name: str) -> tuple[str, bool, bool]:
    """``(base, remat, compiled)`` of a system name such as ``funczero-z3-remat-c``."""
    compiled = name.endswith("-c")
    base = name[:-2] if compiled else name
    remat = base.endswith("-remat")
    base = base[: -len("-remat")] if remat else base
    return base, remat, compiled


def _check_system(name: str) -> str | None:
    base, remat, compiled = split_system(name)
    if base not in BASE_SYSTEMS:
        return f"unknown system {name!r}"
    if remat and not base.startswith("funczero"):
        return f"{name!r}: -remat is for funczero systems"
    if compiled and base not in COMPILABLE:
        return f"{name!r}: -c is for {COMPILABLE}"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nprocs", type=int, default=None, help="processes (default: visible GPUs; 2 on cpu)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma list; ds* skipped without deepspeed")
    ap.add_argument("--model", choices=("gpt", "hf-llama"), default="gpt",
                    help="funczero's GPT, or a transformers LlamaForCausalLM (TinyLlama-1.1B shape)")  # fmt: skip
    ap.add_argument("--isolate", action="store_true",
                    help="run each system in a fresh set of processes (peak memory not inflated by "
                    "what earlier systems left behind)")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="a tiny model and 1+2 steps (smoke test)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4, help="micro-batch per process")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--reduce-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--tag", default="", help="added to every JSON line (e.g. a code version)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--profile", default="", help="systems to profile for 2 extra steps (after timing)")
    ap.add_argument("--profile-dir", default=".", help="where rank 0 writes <system>.trace.json.gz")
    ap.add_argument("--find-syncs", action="store_true",
                    help="after timing, run one step with sync debug mode 'error' and print where "
                    "a host sync happens (leaves that system's state broken: run it on its own)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.model == "hf-llama" and not args.tiny:
        # TinyLlama-1.1B: hidden 2048, 22 layers, 32 heads (4 KV heads), MLP 5632, vocab 32000.
        args.d_model, args.layers, args.heads = 2048, 22, 32
    if args.tiny:
        args.vocab, args.d_model, args.layers, args.heads, args.seq, args.mbs = 256, 64, 2, 4, 32, 2
        args.warmup, args.steps = 1, 2
    args.systems = [ALIASES.get(s.strip(), s.strip()) for s in args.systems.split(",") if s.strip()]
    args.profile = {ALIASES.get(s.strip(), s.strip()) for s in args.profile.split(",") if s.strip()}
    errors = [e for e in map(_check_system, args.systems) if e]
    if errors:
        ap.error("; ".join(errors) + f"; base systems: {BASE_SYSTEMS}, variants -remat, -c")
    if args.nprocs is None:
        args.nprocs = torch.cuda.device_count() if args.device == "cuda" else 2
    return args


def model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(
        vocab_size=args.vocab, seq_len=args.seq, d_model=args.d_model, n_layers=args.layers,
        n_heads=args.heads, dropout=0.0, bias=False, tie_weights=False,
    )  # fmt: skip


def llama_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig  # noqa: PLC0415  (optional: --model hf-llama)

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 8),
        intermediate_size=args.d_model * 11 // 4, max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False,  # training: no KV cache
    )  # fmt: skip


def num_params(args: argparse.Namespace) -> int:
    return sum(p.numel() for p in build_model(args, torch.device("meta")).parameters())


def make_batch(args: argparse.Namespace, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    tokens = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    if args.model == "gpt":
        return GPT(model_config(args), device=device)
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    with torch.device(device):
        return LlamaForCausalLM(llama_config(args))


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (FSDP2 shards and regional compilation compile each)."""
    return list(model.blocks) if isinstance(model, GPT) else list(model.model.layers)


def logits_of(model: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def loss_fn(model: Callable[..., Any], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy in fp32 (both models; HF returns ``.logits``)."""
    x, y = batch
    return F.cross_entropy(logits_of(model, x).float().flatten(0, 1), y.flatten())


def compile_blocks(model: torch.nn.Module) -> None:
    """Regional compilation of a plain PyTorch model: each block ``torch.compile``d in place."""
    for block in blocks_of(model):
        block.compile()


# --------------------------------------------------------------------------- systems
# Each returns ``step() -> loss tensor`` (this rank's or the global mean) and a cleanup.


def setup_funczero(
    stage: int, args: argparse.Namespace, device: torch.device, remat: bool = False, compiled: bool = False
) -> Callable[[], Any]:
    model = build_model(args, device)
    precision = Precision.from_name("bf16", reduce_dtype=args.reduce_dtype)
    plan = build_plan(
        model, stage=stage, precision=precision, param_persistence_threshold=100_000, remat=remat
    )
    params, buffers = extract_tensors(model, plan.spec)
    release_module_tensors(model)
    opt = optim.adamw(args.lr, weight_decay=0.01)
    holder = {"state": init_state(plan, opt, params, buffers, device=device)}
    del params
    # compile only when asked: the eager rows also run against older funczero trees (PYTHONPATH)
    step_fn = make_train_step(loss_fn, opt, plan, **({"compile": True} if compiled else {}))
    batch = make_batch(args, plan.rank, device)

    def step() -> torch.Tensor:
        holder["state"], metrics = step_fn(holder["state"], batch)
        return metrics["loss"]

    step.holder = holder  # type: ignore[attr-defined]  # freed by the caller
    return step


def _torch_adamw(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    # fused=True: the fastest torch.optim AdamW on GPU (one kernel for all parameters).
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=fused)


def setup_eager(args: argparse.Namespace, device: torch.device, compiled: bool, ddp: bool) -> Callable[[], Any]:
    """Plain PyTorch (``ddp``: under DistributedDataParallel): fp32 weights, autocast bf16."""
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    model = build_model(args, device)
    if compiled:
        compile_blocks(model)
    opt = _torch_adamw(model, args, device)
    run = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    x, y = make_batch(args, dist.get_rank(), device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = logits_of(run, x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.holder = {"model": run, "opt": opt}  # type: ignore[attr-defined]
    return step


def setup_fsdp2(args: argparse.Namespace, device: torch.device, compiled: bool) -> Callable[[], Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = build_model(args, device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks_of(model):
        if compiled:
            block.compile()
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = _torch_adamw(model, args, device)
    x, y = make_batch(args, dist.get_rank(), device)

    def step() -> torch.Tensor:
        loss = loss_fn(model, (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.holder = {"model": model, "opt": opt}  # type: ignore[attr-defined]
    return step


def setup_deepspeed(stage: int, args: argparse.Namespace, device: torch.device) -> Callable[[], Any]:
    import deepspeed  # noqa: PLC0415  (optional dependency)

    model = build_model(args, device)
    config = {
        "train_micro_batch_size_per_gpu": args.mbs,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x, y = make_batch(args, dist.get_rank(), device)

    def step() -> torch.Tensor:
        loss = loss_fn(engine, (x, y))
        engine.backward(loss)
        engine.step()
        return loss.detach()

    step.holder = {"engine": engine}  # type: ignore[attr-defined]
    return step


def setup(name: str, args: argparse.Namespace, device: torch.device) -> Callable[[], Any]:
    base, remat, compiled = split_system(name)
    if base.startswith("funczero-z"):
        return setup_funczero(int(base[-1]), args, device, remat=remat, compiled=compiled)
    if base in ("eager", "ddp"):
        return setup_eager(args, device, compiled, ddp=base == "ddp")
    if base == "fsdp2":
        return setup_fsdp2(args, device, compiled)
    return setup_deepspeed(int(base[-1]), args, device)


# --------------------------------------------------------------------------- measurement


class Clock:
    """Per-step times: CUDA events on the current stream (no host sync), or wall time on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def count_host_syncs(step: Callable[[], Any], device: torch.device) -> int | None:
    """Synchronising CUDA calls during one step, as ``set_sync_debug_mode('warn')`` reports them."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # Only real syncs: the first call also warns that the debug mode is a prototype.
    found = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    if found:
        print(f"# host syncs: {sorted(set(found))[:3]}", file=sys.stderr, flush=True)
    return len(found)


def profile_steps(name: str, step: Callable[[], Any], args: argparse.Namespace, device: torch.device) -> None:
    """Two steps under torch.profiler; rank 0 prints the top kernels and writes a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / 2
    if dist.get_rank() == 0:
        events = prof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3 / 2
        print(f"# profile {name}: {wall_ms:.1f} ms per step (profiled), device busy {busy:.1f} ms "
              f"per step (sum of kernel times; idle = the difference)", file=sys.stderr, flush=True)  # fmt: skip
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"# profile {name} (2 steps)\n" + events.table(sort_by=sort, row_limit=25, max_name_column_width=70),
              file=sys.stderr, flush=True)  # fmt: skip
        path = Path(args.profile_dir) / f"{name}.trace.json"
        prof.export_chrome_trace(str(path))
        import gzip, shutil  # noqa: E401, PLC0415

        with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()


def run_system(name: str, args: argparse.Namespace, device: torch.device, world: int) -> dict[str, Any]:
    n_params = num_params(args)
    t0 = time.perf_counter()
    step = setup(name, args, device)
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    graphs0, recompiles0 = _dynamo_counts()
    for _ in range(args.warmup):
        step()
    graphs1, recompiles1 = _dynamo_counts()
    clock = Clock(device)
    clock.mark()
    loss = None
    host_ms = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        host_ms.append((time.perf_counter() - t) * 1e3)  # the host's time in the call (no sync)
        clock.mark()
    times = clock.step_ms()
    graphs2, recompiles2 = _dynamo_counts()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    syncs = count_host_syncs(step, device) if name.startswith("funczero") else None
    if name in args.profile:
        profile_steps(name, step, args, device)
    if args.find_syncs and device.type == "cuda":
        import traceback  # noqa: PLC0415

        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            print(f"# {name} rank {dist.get_rank()}: no host sync", file=sys.stderr, flush=True)
        except RuntimeError:
            print(f"# {name} rank {dist.get_rank()}: host sync at\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()

    # Max over ranks of the median step, peak memory and sync count; mean loss.
    stats = torch.tensor(
        [statistics.median(times), min(times), peak, float(syncs or 0), float(loss)],
        dtype=torch.float64, device=device,
    )  # fmt: skip
    worst = stats.clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    mean = stats.clone()
    dist.all_reduce(mean, op=dist.ReduceOp.SUM)
    med_ms, min_ms, peak_gib, syncs_max = worst[0].item(), worst[1].item(), worst[2].item(), worst[3].item()
    loss_mean = mean[4].item() / world
    step.holder.clear()  # type: ignore[attr-defined]
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    tokens = world * args.mbs * args.seq
    flops_per_token = 6 * n_params + 12 * args.layers * args.d_model * args.seq
    tps = tokens / (med_ms / 1e3)
    tflops = tps / world * flops_per_token / 1e12
    out = {
        "impl": name,
        "world": world,
        "params_M": round(n_params / 1e6, 1),
        "seq": args.seq,
        "mbs": args.mbs,
        "step_ms_median": round(med_ms, 2),
        "step_ms_min": round(min_ms, 2),
        "tokens_per_s": round(tps),
        "tflops_per_gpu": round(tflops, 1),
        "mfu_vs_989": round(tflops / PEAK_TFLOPS, 4),
        "peak_mem_gib_max": round(peak_gib, 3),
        "loss": round(loss_mean, 4),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "setup_s": round(setup_s, 1),
        "host_ms_median": round(statistics.median(host_ms), 2),
        "model": args.model,
    }
    if split_system(name)[2]:
        # Graphs Dynamo compiled during warm-up (one per distinct block type is the goal) and
        # any compiled or recompiled during the timed steps (0 is the goal).
        out["graphs"] = graphs1 - graphs0
        out["graphs_after_warmup"] = graphs2 - graphs1
        out["recompiles"] = recompiles2 - recompiles0
    if name.startswith("funczero"):
        out["host_syncs"] = int(syncs_max) if device.type == "cuda" else None
        out["funczero_src"] = str(Path(funczero.__file__).resolve().parent)
    if args.tag:
        out["tag"] = args.tag
    return out


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters  # noqa: PLC0415

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["recompiles"].values()))


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001  (missing, or broken without its compiled ops)
        return False
    return True


def worker(rank: int, world: int, args: argparse.Namespace, port: int | None) -> None:
    if port is not None:  # spawned by main(); torchrun sets the environment itself
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    local = int(os.environ.get("LOCAL_RANK", rank))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        backend = "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10), **kwargs)
    try:
        have_ds = deepspeed_available()
        for name in args.systems:
            if name.startswith("ds") and not have_ds:
                if rank == 0:
                    print(f"# {name}: skipped (deepspeed is not importable)", file=sys.stderr, flush=True)
                continue
            line = json.dumps(run_system(name, args, device, world))
            if rank == 0:
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    if args.nprocs < 1:
        raise SystemExit("no GPUs visible; use --device cpu")
    import torch.multiprocessing as mp  # noqa: PLC0415

    if not args.isolate:
        mp.spawn(worker, args=(args.nprocs, args, _free_port()), nprocs=args.nprocs, join=True)
        return
    systems = args.systems
    for name in systems:  # each system in fresh processes: its peak memory is its own
        args.systems = [name]
        try:
            mp.spawn(worker, args=(args.nprocs, args, _free_port()), nprocs=args.nprocs, join=True)
        except Exception as e:  # noqa: BLE001  (report and go on with the next system)
            print(f"# {name}: failed: {e}", file=sys.stderr, flush=True)
    args.systems = systems


if __name__ == "__main__":
    main()
