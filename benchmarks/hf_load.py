"""Load throughput from a local Hugging Face checkpoint: ``transformers`` against funczero.

Writes a Llama-shaped model with random weights once (``save_pretrained``, bf16, sharded into
1 GB files, in a temporary directory deleted afterwards), reads every file once so all systems
start from the page cache, then runs each system in a fresh Python process (its own CUDA context
and peak counters):

* ``hf``: ``AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16).to(device)``;
* ``hf-device-map``: ``from_pretrained(dir, dtype=bfloat16, device_map=device)`` (loads straight
  to the device; needs ``accelerate``, skipped without it);
* ``funczero-z0`` / ``funczero-z3``: the model built on the meta device,
  ``funczero.initialize`` at that ZeRO stage with bf16 and AdamW (``init_s``: it creates the
  random weights module by module), then ``load_pretrained(..., donate=True)`` (``load_s``: what
  ``initialize(init_from=dir)`` adds). World size 1.

Run on one GPU::

    python benchmarks/hf_load.py --device cuda                 # TinyLlama-1.1B shape
    python benchmarks/hf_load.py --device cuda --out benchmarks/results/hf-load.jsonl

and on the CPU in seconds (a smoke run; the numbers mean little)::

    python benchmarks/hf_load.py --device cpu --tiny

Prints one JSON line per system and a table: seconds, GB/s of checkpoint bytes (bf16 on disk;
``load_s`` for funczero, the whole call for ``transformers``), peak device memory allocated
(``max_memory_allocated``; CUDA only) and peak host RSS growth (``ru_maxrss`` over the RSS
before the call).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

GB = 1e9
SYSTEMS = ("hf", "hf-device-map", "funczero-z0", "funczero-z3")
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {  # TinyLlama-1.1B
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    },
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama (CPU smoke runs)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {','.join(SYSTEMS)}")
    ap.add_argument("--tmp", default=None, help="where the checkpoint is written (deleted after)")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one system, in this process
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = "tiny" if args.tiny else "llama-1b"
    if args.worker:
        print(json.dumps(run_system(args.worker, shape, Path(args.dir), torch.device(args.device))), flush=True)
        return 0
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        ap.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    tmp = Path(tempfile.mkdtemp(prefix="hf-load-", dir=args.tmp))
    rows = []
    try:
        ckpt = tmp / "hf"
        write_checkpoint(shape, ckpt)  # here: this process's memory is never measured
        files = sorted(ckpt.glob("*.safetensors"))
        for f in files:  # into the page cache: every system reads warm files
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
        for system in systems:
            out = _child(["--worker", system, "--dir", str(ckpt)], args)
            row = json.loads(out.strip().splitlines()[-1])
            row.update(device=args.device, shape=shape, files=len(files))
            if "skipped" in row:
                print(f"# {system} skipped: {row['skipped']}", flush=True)
                continue
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows)
    return 0


def _child(extra: list[str], args: argparse.Namespace) -> str:
    """Run this script on one task in a fresh interpreter; return its stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, *extra]
    if args.tiny:
        cmd.append("--tiny")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(extra[:2])} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def llama_config(shape: str) -> Any:
    import transformers

    return transformers.LlamaConfig(**SHAPES[shape])


def write_checkpoint(shape: str, directory: Path) -> None:
    """Random bf16 weights in ``save_pretrained``'s sharded layout (values do not matter here)."""
    import transformers

    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(shape))
    model.to(torch.bfloat16).to_empty(device="cpu")  # bf16 from the start: 2 bytes a parameter
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(directory, max_shard_size="1GB" if shape == "llama-1b" else "200KB")
    del model
    gc.collect()


def run_system(system: str, shape: str, directory: Path, device: torch.device) -> dict[str, Any]:
    import transformers

    ckpt_bytes = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    with torch.device("meta"):  # one-time imports of the meta device context, outside the timing
        transformers.LlamaForCausalLM(llama_config("tiny"))
    rss0 = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    row: dict[str, Any] = {"system": system}
    if system == "hf-device-map" and importlib.util.find_spec("accelerate") is None:
        return {**row, "skipped": "device_map needs `pip install accelerate`"}
    if system.startswith("hf"):
        # transformers renamed torch_dtype= to dtype= in 4.56; an older one would take dtype= as a
        # config attribute and load fp32.
        dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs: dict[str, Any] = {dtype_key: torch.bfloat16}
        if system == "hf":
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs).to(device)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs, device_map=str(device))
        row["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        _sync(device)
        seconds = time.perf_counter() - t0
        row.update(load_s=round(seconds, 3), params=sum(p.numel() for p in model.parameters()))
    else:
        seconds = _funczero(system, shape, directory, device, row, t0)
    row.update(
        ckpt_GB=float(f"{ckpt_bytes / GB:.4g}"),
        GB_per_s=float(f"{ckpt_bytes / GB / seconds:.4g}"),
        peak_device_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None,
        rss_growth_GB=round((_ru_maxrss() - rss0) / GB, 3),
    )
    return row


def _funczero(system: str, shape: str, directory: Path, device: torch.device, row: dict[str, Any], t0: float) -> float:
    """Meta init then ``load_pretrained``; returns the load's seconds (``row`` gets the rest)."""
    import transformers

    import funczero
    from funczero.pretrained import load_pretrained

    stage = int(system.rsplit("z", 1)[1])
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if shape == "tiny" else {})},
    }  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(shape))
    torch.manual_seed(0)
    run = funczero.initialize(model, config, _no_loss, device=device)
    _sync(device)
    t1 = time.perf_counter()
    state = load_pretrained(run.state, directory, plan=run.plan, donate=True)
    _sync(device)
    t2 = time.perf_counter()
    row.update(stage=stage, init_s=round(t1 - t0, 3), load_s=round(t2 - t1, 3), total_s=round(t2 - t0, 3),
               params=run.plan.spec.numel())  # fmt: skip
    del state
    return t2 - t1


def _no_loss(model: Any, batch: Any) -> torch.Tensor:
    raise RuntimeError("hf_load builds states only; it never steps")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| system | load s | GB/s | init s (funczero) | peak device GiB | host RSS growth GB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['load_s']} | {r['GB_per_s']} | {r.get('init_s', '-')} | "
              f"{r['peak_device_GiB'] if r['peak_device_GiB'] is not None else '-'} | {r['rss_growth_GB']} |")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
