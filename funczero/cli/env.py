"""``funczero env``: what a bug report needs (DeepSpeed's ``ds_report``).

Versions (funczero, Python, torch, CUDA, NCCL, optree, safetensors and the optional extras),
devices, which ``torch.distributed`` backends actually work (each is tried on a one-process
group), and the environment variables that change how a job runs. Values of variables whose
names look secret (``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``) are never printed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import tempfile
from typing import Annotated, Any

import typer

__all__ = ["collect_env", "env"]

_PACKAGES = ("torch", "optree", "safetensors", "numpy", "psutil", "typer", "rich")
_EXTRAS = {  # distribution -> funczero extra
    "tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet", "matplotlib": "plot",
    "transformers": "(funczero estimate --hf-config)",
}
_VAR_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "FUNCZERO_", "GLOO_", "WANDB_",
                 "COMET_", "PYTORCH_", "CUDA_", "OMP_", "MKL_", "TORCHELASTIC_")
_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
         "MASTER_PORT", "NODE_RANK", "CROSS_RANK", "CROSS_SIZE", "LD_LIBRARY_PATH")
_SECRET = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_backend(backend: str) -> str:
    """``"works"`` if a one-process group of ``backend`` can all-reduce, else why not."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this build"
    available = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available,
                 "mpi": dist.is_mpi_available}[backend]()
    if not available:
        return "not built into this torch"
    if backend == "nccl" and not torch.cuda.is_available():
        return "built, but no CUDA device is visible"
    if backend == "mpi":
        return "built (not tried: needs an MPI launcher)"
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        try:
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
            device = "cuda" if backend == "nccl" else "cpu"
            t = torch.ones(1, device=device)
            dist.all_reduce(t)
            return "works" if t.item() == 1.0 else f"all_reduce gave {t.item()}"
        except Exception as e:  # a report: every failure is an answer, not a crash
            return f"fails: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _devices() -> list[dict[str, Any]]:
    import torch

    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2**30, 1)})
    return out


def _env_vars() -> dict[str, str]:
    names = sorted(n for n in os.environ if n in _VARS or n.startswith(_VAR_PREFIXES))
    return {n: "<set, not shown>" if any(s in n.upper() for s in _SECRET) else os.environ[n]
            for n in names}


def collect_env(*, try_backends: bool = True) -> dict[str, Any]:
    """Everything ``funczero env`` reports, as a JSON-able dict.

    Example:
        >>> report = collect_env(try_backends=False)
        >>> sorted(report)[:4]
        ['backends', 'cpu', 'cuda', 'devices']
    """
    import torch

    import funczero

    cuda: dict[str, Any] = {"available": torch.cuda.is_available(), "torch_built_with": torch.version.cuda}
    nccl = None
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:  # reported, not raised
            nccl = f"unknown ({type(e).__name__})"
    versions = {"funczero": funczero.__version__, "python": sys.version.split()[0]}
    versions.update({p: _version(p) for p in _PACKAGES})
    versions["nccl"] = nccl
    backends = {b: (_try_backend(b) if try_backends else "not tried") for b in ("gloo", "nccl", "mpi")}
    return {
        "versions": versions,
        "extras": {name: _version(name) for name in _EXTRAS},
        "platform": platform.platform(),
        "cpu": {"logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "cuda": cuda,
        "devices": _devices(),
        "backends": backends,
        "env": _env_vars(),
        "python_executable": sys.executable,
        "funczero_path": os.path.dirname(funczero.__file__),
    }


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, highlight=False, soft_wrap=True)
    table = Table(title="funczero env", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for name, v in report["versions"].items():
        table.add_row(name, v or "not installed")
    for name, v in report["extras"].items():
        table.add_row(f"{name} (extra {_EXTRAS[name]})", v or "not installed")
    table.add_row("platform", report["platform"])
    table.add_row("python executable", report["python_executable"])
    table.add_row("funczero path", report["funczero_path"])
    table.add_row("CPU cores / torch threads",
                  f"{report['cpu']['logical_cores']} / {report['cpu']['torch_threads']}")
    cuda = report["cuda"]
    table.add_row("CUDA", f"available: {cuda['available']}; torch built with: {cuda['torch_built_with']}")
    for d in report["devices"]:
        table.add_row(f"cuda:{d['index']}", f"{d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)")
    if not report["devices"]:
        table.add_row("devices", "CPU only")
    for b, status in report["backends"].items():
        table.add_row(f"backend {b}", status)
    for n, v in report["env"].items():
        table.add_row(f"${n}", v)
    if not report["env"]:
        table.add_row("environment", "no distributed/NCCL/funczero variables set")
    console.print(table)


def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    no_backends: Annotated[
        bool, typer.Option("--no-backends", help="Skip trying each distributed backend.")
    ] = False,
) -> None:
    """Report versions, devices, working distributed backends and relevant env variables."""
    report = collect_env(try_backends=not no_backends)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print(report)
