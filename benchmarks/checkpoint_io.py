"""Measure checkpoint I/O: save/load throughput and the peak memory of reshard and consolidate.

Run ``python benchmarks/checkpoint_io.py --dir /tmp/ckbench --params-mb 128``. It builds a
hand-made fp32 stage-0 state (params aliased to master, plus Adam's two moments: about
3x ``--params-mb`` on disk), then:

* measures the disk itself (a plain 256 MiB write with fsync, and a cold read), before and
  after, because on a shared machine it varies from minute to minute;
* times ``save`` (fsync included) and ``load`` at world size 1 in this process, and at world
  size 2 with two gloo ranks writing and reading concurrently; before each load the files are
  evicted from the page cache (``posix_fadvise(DONTNEED)``), so loads read the disk;
* runs ``reshard`` (to 4 ranks, stage 3) and ``consolidate`` (fp32) each in a fresh process
  and reports its peak RSS (``VmHWM``) next to its RSS after imports, the largest tensor
  and the model size.

``--suite loads`` (also part of the default ``all``) compares with PyTorch DCP
(``torch.distributed.checkpoint``) on the same state: at world size 1 (stage 0) and 2 (two gloo
ranks, stage 3: parameters are the master shards, so both sizes hold the same bytes), each in a
fresh process, it times ``--repeats`` saves of each, then every load variant ``--repeats``
times, interleaved: funczero into a new state or in place (``donate=True``), verified or not,
and DCP's in-place ``dcp.load`` into the same tensors (a rank's own shards under rank-prefixed
keys, as funczero stores them). Each variant runs cold (the files evicted from the page cache
with ``posix_fadvise(DONTNEED)`` after an fsync: no root needed, but only clean pages go) and
then warm. Per variant: the median wall time, GB/s, the CPU seconds of all ranks (user and
system: what the operation costs whatever else the machine runs) and the peak RSS beyond what
the rank held before (``VmHWM`` reset through ``/proc/self/clear_refs``; large allocations
stay mmapped, so freed memory leaves the RSS at once). It prints a Markdown table.

Results print as JSON. Numbers from one machine are indicative only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

__all__ = ["main"]


def _shapes(params_mb: int) -> dict[str, tuple[int, ...]]:
    """A GPT-like mix: one large embedding (the largest tensor), blocks of matrices, vectors."""
    d = 1024
    total = params_mb * (1 << 20) // 4
    vocab = max(total // 4 // d, 1)
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, d)}
    left, i = total - vocab * d, 0
    while left > 4 * d * d:
        shapes[f"blocks.{i}.fc.weight"] = (4 * d, d)
        shapes[f"blocks.{i}.fc.bias"] = (4 * d,)
        shapes[f"blocks.{i}.ln.weight"] = (d,)
        left -= 4 * d * d + 5 * d
        i += 1
    shapes["frozen"] = (d,)
    return shapes


def _evict(directory: Path) -> None:
    for path in directory.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_disk(scratch: Path, nbytes: int = 256 << 20) -> dict[str, float]:
    """Baseline: one plain file written (with fsync) and read back cold, in 16 MiB blocks."""
    block = os.urandom(16 << 20)
    path = scratch / "raw.bin"
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        f.writelines(block for _ in range(nbytes // len(block)))
        os.fsync(f.fileno())
    write = time.perf_counter() - t0
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(len(block)):
            pass
    read = time.perf_counter() - t0
    path.unlink()
    return {"write_fsync_GBps": nbytes / write / 1e9, "read_cold_GBps": nbytes / read / 1e9}


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))


def _save_load(
    root: Path, shapes: dict[str, tuple[int, ...]], world: int, rank: int
) -> dict[str, float]:
    import torch.distributed as dist

    from funczero import checkpoint
    from funczero.testing.states import toy_state

    state = toy_state(world_size=world, rank=rank, stage=0 if world == 1 else 2, shapes=shapes)
    like = toy_state(
        world_size=world, rank=rank, stage=0 if world == 1 else 2, shapes=shapes, seed=1
    )
    barrier = dist.barrier if world > 1 else (lambda: None)
    barrier()
    t0 = time.perf_counter()
    path = checkpoint.save(root, state, tag="bench")
    t_save = time.perf_counter() - t0
    if rank == 0:
        _evict(path)
    barrier()
    t0 = time.perf_counter()
    checkpoint.load(root, like=like)
    barrier()
    t_load = time.perf_counter() - t0
    return {"save_s": t_save, "load_s": t_load}


def _dist_worker(rank: int, world: int, root: str, shapes: dict[str, Any], out: str) -> None:
    res = _save_load(Path(root), {k: tuple(v) for k, v in shapes.items()}, world, rank)
    if rank == 0:
        Path(out).write_text(json.dumps(res))


def _vm_hwm() -> int:
    """Peak RSS of this process image in bytes (``VmHWM``; ``ru_maxrss`` survives exec on
    Linux, so a child would report its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(kind: str, src: str, dst: str) -> None:
    """Run one tool in this (fresh) process; print RSS after imports and peak RSS (bytes)."""
    from funczero import checkpoint

    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if kind == "reshard":
        checkpoint.reshard(src, dst, world_size=4, stage=3)
    else:
        checkpoint.consolidate(src, dst)
    seconds = time.perf_counter() - t0
    peak = _vm_hwm()
    print(json.dumps({"rss_after_imports": base, "peak_rss": peak, "seconds": seconds}))


LOAD_VARIANTS = (
    # (name, system, verify, donate)
    ("funczero new state, verified", "funczero", True, False),
    ("funczero new state, unverified", "funczero", False, False),
    ("funczero in place, verified", "funczero", True, True),
    ("funczero in place, unverified", "funczero", False, True),
    ("DCP in place", "dcp", False, True),
)


def _reset_peak() -> int:
    """Set this process's ``VmHWM`` to its current RSS (Linux ``clear_refs``); return it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _vm_hwm()


def _cpu_seconds() -> float:
    """CPU time of this process, every thread, user and system (the page-cache copies of a
    read are system time): what an operation costs whatever else the machine runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _dcp_dict(state: Any) -> dict[str, torch.Tensor]:
    """The state as DCP's flat ``state_dict``: each tensor once, a rank's own parts (shards,
    per-rank tensors) under rank-prefixed keys so DCP stores and loads them per rank, as
    funczero does (plain tensors under one key would be taken as replicated)."""
    from funczero.checkpoint.entry import state_entries

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for entry, leaf in state_entries(state):
        if id(leaf) in seen:
            continue
        seen.add(id(leaf))
        key = (
            entry.path
            if entry.placement == "replicated"
            else f"rank{state.layout.rank}/{entry.path}"
        )
        out[key] = leaf
    return out


def _dcp_save(state: Any, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_dict(state), checkpoint_id=str(directory))


def _files_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _evict_all(directory: Path) -> None:
    """Drop ``directory``'s files from the page cache (fsync first: only clean pages go)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _load_matrix(
    root: Path, shapes: dict[str, tuple[int, ...]], world: int, rank: int, repeats: int
) -> dict[str, Any]:
    """Save both ways ``repeats`` times, then every load variant cold and warm ``repeats``
    times (variants interleaved, so a busy spell of the machine hits all of them)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from funczero import checkpoint
    from funczero.testing.states import toy_state

    stage = 0 if world == 1 else 3  # params aliased to master: the same bytes at both sizes
    barrier = dist.barrier if world > 1 else (lambda: None)
    state = toy_state(world_size=world, rank=rank, stage=stage, shapes=shapes)
    times: dict[str, list[float]] = {}
    peaks: dict[str, list[int]] = {}
    cpu: dict[str, list[float]] = {}

    def timed(name: str, fn: Any, evict: Path | None = None) -> None:
        if evict is not None and rank == 0:
            _evict_all(evict)
        barrier()
        base = _reset_peak()
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        fn()
        c1 = _cpu_seconds()
        barrier()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        peaks.setdefault(name, []).append(_vm_hwm() - base)
        cpu.setdefault(name, []).append(c1 - c0)

    for r in range(repeats):
        fz, dc = root / f"fz{r}", root / f"dcp{r}"
        timed("funczero save", functools.partial(checkpoint.save, fz, state, tag="bench"))
        timed("DCP save", functools.partial(_dcp_save, state, dc))
        if r < repeats - 1 and rank == 0:
            shutil.rmtree(fz)
            shutil.rmtree(dc)
    sizes = {"funczero": _files_bytes(fz / "bench"), "dcp": _files_bytes(dc)}
    del state
    holder = {"like": toy_state(world_size=world, rank=rank, stage=stage, shapes=shapes, seed=1)}

    def load_once(system: str, verify: bool, donate: bool) -> None:
        like = holder.pop("like")
        if system == "dcp":
            dcp.load(_dcp_dict(like), checkpoint_id=str(dc))
            holder["like"] = like
            return
        got, _ = checkpoint.load(fz / "bench", like=like, verify=verify, donate=donate)
        holder["like"] = got if donate else like  # a donated like is gone: the result replaces it

    for _ in range(repeats):
        for name, system, verify, donate in LOAD_VARIANTS:
            for temp in ("cold", "warm"):
                evict = (fz if system == "funczero" else dc) if temp == "cold" else None
                timed(
                    f"{name}, {temp}", functools.partial(load_once, system, verify, donate), evict
                )
    return {"times": times, "peaks": peaks, "cpu": cpu, "bytes": sizes}


def _matrix_worker(
    rank: int, world: int, root: str, shapes: dict[str, Any], repeats: int, out: str
) -> None:
    res = _load_matrix(Path(root), {k: tuple(v) for k, v in shapes.items()}, world, rank, repeats)
    Path(out + f".{rank}").write_text(json.dumps(res))


def _matrix_child(scratch: Path, params_mb: int, world: int, repeats: int) -> None:
    """One world size's matrix, in this fresh process (and its ranks); prints JSON."""
    torch.set_num_threads(1)
    shapes = _shapes(params_mb)
    out = scratch / f"matrix-w{world}.json"
    root = scratch / f"matrix-w{world}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    load_before = os.getloadavg()
    if world == 1:
        _matrix_worker(0, 1, str(root), shapes, repeats, str(out))
    else:
        from funczero.testing.distributed import run_distributed

        run_distributed(_matrix_worker, world, str(root), shapes, repeats, str(out), timeout=3000)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    shutil.rmtree(root, ignore_errors=True)
    rows = {}
    for name in ranks[0]["times"]:
        system = "dcp" if name.startswith("DCP") else "funczero"
        seconds = statistics.median(ranks[0]["times"][name])
        # A rank's own peak beyond what it held before (max over ranks, median over repeats).
        peak = statistics.median(max(rk["peaks"][name][i] for rk in ranks) for i in range(repeats))
        rows[name] = {
            "seconds": seconds,
            "cpu_s": statistics.median(
                sum(rk["cpu"][name][i] for rk in ranks) for i in range(repeats)
            ),
            "GBps": ranks[0]["bytes"][system] / seconds / 1e9,
            "peak_extra_MB": max(peak, 0) / 1e6,  # below 0: the RSS fell
            "all_seconds": ranks[0]["times"][name],
        }
    print(
        json.dumps(
            {
                "world_size": world,
                "checkpoint_bytes": ranks[0]["bytes"],
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "rows": rows,
            }
        )
    )


def _print_table(results: list[dict[str, Any]]) -> None:
    print(
        "| ranks | operation | seconds: median (runs) | GB/s | CPU s (all ranks) "
        "| peak extra MB (max over ranks) |"
    )
    print("|---|---|---|---|---|---|")
    for res in results:
        for name, row in res["rows"].items():
            print(
                f"| {res['world_size']} | {name} | {row['seconds']:.2f} "
                f"({', '.join(f'{x:.2f}' for x in row['all_seconds'])}) | {row['GBps']:.2f} "
                f"| {row['cpu_s']:.2f} | {row['peak_extra_MB']:.0f} |"
            )


def _loads(scratch: Path, params_mb: int, repeats: int) -> None:
    """The save/load comparison, each world size in a fresh process whose large allocations
    stay mmapped (``MALLOC_MMAP_THRESHOLD_``), so freed memory leaves the RSS at once and a
    peak measures what one operation held."""
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    results = []
    for world in (1, 2):
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--dir",
                str(scratch),
                "--params-mb",
                str(params_mb),
                "--repeats",
                str(repeats),
                "--matrix-child",
                str(world),
            ],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=1))
    _print_table(results)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", required=True, help="scratch directory (deleted and recreated)")
    ap.add_argument("--params-mb", type=int, default=128, help="fp32 parameter megabytes")
    ap.add_argument(
        "--suite",
        choices=("all", "loads", "tools"),
        default="all",
        help="loads: the save/load comparison with DCP only; tools: the rest only",
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs of each load variant")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--matrix-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    if args.matrix_child:
        _matrix_child(Path(args.dir), args.params_mb, args.matrix_child, args.repeats)
        return
    if args.suite in ("all", "loads"):
        _loads(Path(args.dir), args.params_mb, args.repeats)
    if args.suite == "loads":
        return
    torch.set_num_threads(1)
    scratch = Path(args.dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shapes = _shapes(args.params_mb)
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 4
    model = sum(torch.Size(s).numel() for s in shapes.values()) * 4
    results: dict[str, Any] = {"model_bytes_fp32": model, "largest_tensor_bytes": largest}

    results["raw_disk_before"] = _raw_disk(scratch)
    w1 = _save_load(scratch / "w1", shapes, 1, 0)
    size = _disk_bytes(scratch / "w1")
    results["checkpoint_bytes"] = size
    results["w1"] = {
        **w1,
        "save_GBps": size / w1["save_s"] / 1e9,
        "load_GBps": size / w1["load_s"] / 1e9,
    }

    from funczero.testing.distributed import run_distributed

    out = scratch / "w2.json"
    run_distributed(_dist_worker, 2, str(scratch / "w2"), shapes, str(out), timeout=600)
    w2 = json.loads(out.read_text())
    size2 = _disk_bytes(scratch / "w2")
    results["w2"] = {
        **w2,
        "save_GBps": size2 / w2["save_s"] / 1e9,
        "load_GBps": size2 / w2["load_s"] / 1e9,
    }

    for kind, dst in (("reshard", scratch / "resharded"), ("consolidate", scratch / "hf")):
        _evict(scratch / "w1")
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--dir",
                str(scratch),
                "--child",
                kind,
                str(scratch / "w1"),
                str(dst),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[kind]["peak_minus_imports"] = (
            results[kind]["peak_rss"] - results[kind]["rss_after_imports"]
        )
    results["raw_disk_after"] = _raw_disk(scratch)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
