"""Peak memory while building a training state: a meta-device model created module by module
against building the whole model first.

Two modes.

**One process, the 1.34B GPT** (device memory on a GPU; the original mode)::

    python benchmarks/init_memory.py --device cuda --stage 3
    python benchmarks/init_memory.py --device cpu --tiny

prints one JSON line per path (``meta``, ``eager``): peak device memory allocated during init
(``max_memory_allocated`` on CUDA), host RSS growth, the state's own bytes, the largest module.

**Per-rank host RSS of a Llama-shaped model on gloo CPU ranks** (issue 10's measurement)::

    python benchmarks/init_memory.py --model llama-1b --world 4
    python benchmarks/init_memory.py --model llama-1b --worlds 1,2,4 --phases meta,load,eager
    python benchmarks/init_memory.py --model llama-tiny --worlds 1,2     # seconds: a smoke run

``llama-1b`` is TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4
KV heads, vocab 32000, untied head): 1,100.0M parameters, 4.40 GB in fp32. Each phase runs in a
fresh world of ``--world`` spawned ranks (so each rank's ``ru_maxrss`` is that phase's peak):

* ``eager``: today's way, the full model built on the CPU by every rank
  (``LlamaForCausalLM(config)``), then ``funczero.initialize`` at stage 3;
* ``meta``: the model built on the meta device, ``funczero.initialize`` creates it module by
  module and keeps this rank's shards;
* ``zero-init`` (needs ``deepspeed``; run the script with a Python that has it): DeepSpeed's
  ``LlamaForCausalLM(config)`` under ``deepspeed.zero.Init`` (fp32 partitions, no optimizer);
* ``load``: as ``meta``, then ``load_pretrained(..., donate=True)`` from a Hugging Face directory
  written once by ``save_pretrained`` (sharded, ``--ckpt-dtype``, under a temporary directory
  that is deleted afterwards): what ``initialize(init_from=dir)`` does.

The state is ``--state params`` (fp32, SGD without momentum: the state is the fp32 parameter
shards, 4Ψ/N bytes) or ``--state adamw`` (fp32 master shards and AdamW's two moments, 12Ψ/N).
Each rank reports its RSS before the phase (torch, transformers and the process group already
loaded), its peak RSS (``ru_maxrss``), and the state's bytes; the table compares the peak's growth
with the target ``1.15 x (state of the full model / world) + largest unit`` (largest unit: the
fp32 bytes of the largest ZeRO-3 unit, the root's embedding and head here).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import psutil
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

import funczero
from funczero import optim
from funczero.models.gpt import GPT, GPTConfig
from funczero.module import extract_tensors, release_module_tensors
from funczero.parallel.plan import build_plan
from funczero.train.memory import memory_breakdown

GB = 1e9
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {  # TinyLlama-1.1B
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
    "llama-tiny": {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    },
}  # fmt: skip
STATE_BYTES_PER_PARAM = {"params": 4, "adamw": 12}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-1.3b", choices=["gpt-1.3b", *LLAMA_SHAPES])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="gpt-1.3b mode: a tiny GPT")
    ap.add_argument("--paths", default="meta,eager", help="gpt-1.3b mode: meta,eager")
    ap.add_argument("--world", type=int, default=None, help="Llama mode: one world size")
    ap.add_argument("--worlds", default="1,2,4", help="Llama mode: world sizes (default 1,2,4)")
    ap.add_argument("--phases", default="meta,load", help="Llama mode: of eager,meta,load")
    ap.add_argument("--eager-max-world", type=int, default=2,
                    help="run the eager phase only up to this world size (every rank holds the full model)")
    ap.add_argument("--state", default="params", choices=sorted(STATE_BYTES_PER_PARAM))
    ap.add_argument("--ckpt-dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tmp", default=None, help="where the HF directory is written (deleted after)")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args(argv)
    if args.model == "gpt-1.3b":
        gpt_single_process(args)
    else:
        worlds = [args.world] if args.world else [int(w) for w in args.worlds.split(",")]
        llama_worlds(args, worlds, args.phases.split(","))


# --- Llama mode: per-rank host RSS on gloo ranks ------------------------------------------------


def llama_config(model: str) -> Any:
    import transformers

    return transformers.LlamaConfig(**LLAMA_SHAPES[model])


def llama_worlds(args: argparse.Namespace, worlds: list[int], phases: list[str]) -> None:
    from funczero.testing.distributed import run_distributed

    bad = sorted(set(phases) - {"eager", "meta", "load", "zero-init"})
    if bad:
        raise SystemExit(f"--phases: unknown {bad}; choose from eager, meta, load, zero-init")
    tmp = Path(tempfile.mkdtemp(prefix="init-memory-", dir=args.tmp))
    rows: list[dict[str, Any]] = []
    try:
        hf_dir = tmp / "hf"
        if "load" in phases:
            _in_fresh_process(write_hf_dir, args.model, str(hf_dir), args.ckpt_dtype)
        for world in worlds:
            for phase in phases:
                if phase == "eager" and world > args.eager_max_world:
                    print(f"# skipped eager at world {world}: {world} full models exceed --eager-max-world", flush=True)
                    continue
                out = tmp / f"{phase}-w{world}"
                out.mkdir()
                t0 = time.perf_counter()
                run_distributed(measure_rank, world, phase, args.model, args.state, str(hf_dir), str(out), timeout=3600.0)
                wall = time.perf_counter() - t0
                for rank in range(world):
                    row = json.loads((out / f"rank{rank}.json").read_text())
                    row.update(world=world, phase=phase, state_kind=args.state, world_wall_s=round(wall, 1))
                    rows.append(row)
                    _emit(row, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows)


def _in_fresh_process(fn: Any, *args: Any) -> None:
    """Run ``fn(*args)`` in a spawned process, so this one never holds the full model."""
    proc = mp.get_context("spawn").Process(target=fn, args=args)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} exited with code {proc.exitcode}")


def write_hf_dir(model: str, directory: str, dtype: str) -> None:
    """A random-weight Llama of this shape, saved with ``save_pretrained`` in several files."""
    import transformers

    torch.manual_seed(0)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(llama_config(model))
    # Random values are enough for memory; created in the checkpoint's dtype, without HF's init.
    hf.to(torch.bfloat16 if dtype == "bf16" else torch.float32).to_empty(device="cpu")
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02)
    hf.save_pretrained(directory, max_shard_size="1GB" if model == "llama-1b" else "100KB")
    files = sorted(Path(directory).glob("*.safetensors"))
    print(f"# wrote {len(files)} files, {sum(f.stat().st_size for f in files) / GB:.2f} GB ({dtype}) to {directory}", flush=True)


def measure_rank(rank: int, world: int, phase: str, model: str, state_kind: str, hf_dir: str, out: str) -> None:
    import transformers

    config = llama_config(model)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        # The tiny model's tensors are all small: threshold 0 shards them anyway.
        "zero_optimization": {"stage": 3, **({"stage3_param_persistence_threshold": 0} if model == "llama-tiny" else {})},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}} if state_kind == "adamw"
        else {"type": "SGD", "params": {"lr": 1e-4, "momentum": 0.0}},
    }  # fmt: skip
    # The one-time imports of the meta device context (torch._dynamo among them), before the
    # baseline; zero.Init also needs them done first (dynamo refuses its patched Tensor.__new__).
    with torch.device("meta"):
        transformers.LlamaForCausalLM(llama_config("llama-tiny"))
    if phase == "zero-init":
        import deepspeed  # noqa: F401 - before the baseline, as transformers
    torch.distributed.barrier()
    proc = psutil.Process()
    rss0, maxrss0 = proc.memory_info().rss, _ru_maxrss()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if phase == "zero-init":
        return _deepspeed_zero_init(rank, config, state_kind, out, rss0, maxrss0)
    if phase == "eager":
        hf = transformers.LlamaForCausalLM(config)
    else:
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(config)
    t_built = time.perf_counter()
    run = funczero.initialize(hf, ds_config, _no_loss, device="cpu")
    t_init = time.perf_counter()
    state = run.state
    load_peak = None
    if phase == "load":
        from funczero.pretrained import load_pretrained

        with RssSampler() as sampler:  # the load's own peak, under the init's in ru_maxrss
            state = load_pretrained(state, hf_dir, plan=run.plan, donate=True)
        load_peak = sampler.peak
    t_load = time.perf_counter()
    peak = _ru_maxrss()
    breakdown = memory_breakdown(state, run.plan)
    largest_unit = max((u.numel for u in run.plan.units), default=0) * 4
    row = {
        "rank": rank, "params": run.plan.spec.numel(),
        "rss_before_GB": round(rss0 / GB, 3),
        "peak_rss_GB": round(peak / GB, 3),
        "peak_growth_GB": round((peak - rss0) / GB, 3) if peak > maxrss0 else None,
        "load_rss_before_GB": round(load_peak[0] / GB, 3) if load_peak else None,
        "load_peak_rss_GB": round(load_peak[1] / GB, 3) if load_peak else None,
        "state_GB": round((breakdown["total"] - breakdown["grads"]) / GB, 3),
        "largest_unit_fp32_GB": round(largest_unit / GB, 3),
        "build_s": round(t_built - t0, 2), "init_s": round(t_init - t_built, 2),
        "load_s": round(t_load - t_init, 2) if phase == "load" else None,
    }  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def _deepspeed_zero_init(rank: int, config: Any, state_kind: str, out: str, rss0: int, maxrss0: int) -> None:
    """DeepSpeed's way: ``LlamaForCausalLM(config)`` under ``deepspeed.zero.Init`` (fp32).

    zero.Init partitions each module's parameters as soon as the module is built; the state is
    the fp32 parameter partitions (what ``--state params`` holds), no optimizer.
    """
    import deepspeed
    import transformers

    if state_kind != "params":
        raise SystemExit("--phases zero-init measures parameters only (--state params)")
    deepspeed.init_distributed(dist_backend="gloo")  # joins the existing gloo group
    t0 = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3}}, dtype=torch.float32):
        model = transformers.LlamaForCausalLM(config)
    t1 = time.perf_counter()
    peak = _ru_maxrss()
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    # The target's "largest unit" as for funczero's phases (the plan of the same model), so the
    # ratios compare; the largest module zero.Init creates at once is the 0.26 GB embedding.
    with torch.device("meta"):
        units = build_plan(transformers.LlamaForCausalLM(config), stage=3).units
    largest_unit = max((u.numel for u in units), default=0)
    row = {
        "rank": rank, "params": sum(p.ds_numel for p in model.parameters()),
        "rss_before_GB": round(rss0 / GB, 3), "peak_rss_GB": round(peak / GB, 3),
        "peak_growth_GB": round((peak - rss0) / GB, 3) if peak > maxrss0 else None,
        "state_GB": round(local * 4 / GB, 3), "largest_unit_fp32_GB": round(largest_unit * 4 / GB, 3),
        "build_s": round(t1 - t0, 2), "init_s": None, "load_s": None, "deepspeed": deepspeed.__version__,
    }  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


class RssSampler:
    """This process's RSS when entered and its highest sample (every 2 ms) until exit.

    ``peak`` is ``(rss_at_enter, max_rss_sampled)``; sampling can miss a spike shorter than
    the period, ``ru_maxrss`` cannot (but covers the process's whole life).
    """

    def __init__(self, period_s: float = 0.002) -> None:
        self.period_s = period_s
        self.peak = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        rss = psutil.Process().memory_info().rss
        self.peak = (rss, rss)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.period_s):
            self.peak = (self.peak[0], max(self.peak[1], proc.memory_info().rss))


def _no_loss(model: Any, batch: Any) -> torch.Tensor:
    raise RuntimeError("init_memory builds states only; it never steps")


def _ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _emit(row: dict[str, Any], out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def print_table(rows: list[dict[str, Any]]) -> None:
    """Markdown: per world and phase, the worst rank against the target."""
    print("\n| world | phase | state GB per rank | peak RSS per rank GB (growth) | target GB | growth / target | load: RSS before -> peak GB |")
    print("|---|---|---|---|---|---|---|")
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["world"], r["phase"]), []).append(r)
    for (world, phase), rs in groups.items():
        worst = max(rs, key=lambda r: r["peak_rss_GB"])
        full_state = STATE_BYTES_PER_PARAM[worst["state_kind"]] * worst["params"] / GB
        target = 1.15 * full_state / world + worst["largest_unit_fp32_GB"]
        growth = worst["peak_growth_GB"]
        ratio = f"{growth / target:.2f}" if growth is not None else "n/a"
        loads = [r for r in rs if r.get("load_peak_rss_GB") is not None]
        load = "-"
        if loads:
            w = max(loads, key=lambda r: r["load_peak_rss_GB"] - r["load_rss_before_GB"])
            load = f"{w['load_rss_before_GB']:.3f} -> {w['load_peak_rss_GB']:.3f}"
        print(f"| {world} | {phase} | {worst['state_kind']} {worst['state_GB']:.3f} | "
              f"{worst['peak_rss_GB']:.3f} (+{growth if growth is not None else 'n/a'}) | {target:.3f} | {ratio} | {load} |")  # fmt: skip


# --- GPT mode: one process, device memory ---------------------------------------------------------


def gpt_single_process(args: argparse.Namespace) -> None:
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
