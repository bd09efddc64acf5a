"""Worker that records what the launcher gave it, then prints to both streams.

Writes ``$OUT_DIR/rank-<RANK>.json`` with the rank variables, argv, selected
exported variables, CPU affinity and working directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

KEYS = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "NCCL_DEBUG",
    "UCX_TLS",
    "FROM_ENV_FILE",
    "TRICKY",
    "SLURM_PROCID",
    "UNEXPORTED",
]


def write_record() -> None:
    """Write this worker's record to ``$OUT_DIR/rank-<RANK>.json`` atomically."""
    record: dict[str, object] = {k: os.environ.get(k) for k in KEYS}
    record["argv"] = sys.argv[1:]
    record["affinity"] = sorted(os.sched_getaffinity(0))
    record["cwd"] = os.getcwd()
    out = Path(os.environ["OUT_DIR"]) / f"rank-{os.environ['RANK']}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(out)


if __name__ == "__main__":
    write_record()
    print(f"stdout line from rank {os.environ['RANK']}", flush=True)
    print(f"stderr line from rank {os.environ['RANK']}", file=sys.stderr, flush=True)
