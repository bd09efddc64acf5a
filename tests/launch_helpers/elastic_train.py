"""Toy training loop for the elastic test: crashes once, resumes from its progress file.

Usage: elastic_train.py TOTAL_STEPS FAIL_STEP

Each rank saves ``$OUT_DIR/progress-<RANK>.json`` (a stand-in for a checkpoint's
``latest``) after every step and resumes from it on start. Rank 1 exits with code
13 at FAIL_STEP the first time (``$OUT_DIR/crashed`` marks that it did). Each
rank writes ``$OUT_DIR/final-<RANK>.json`` when it finishes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

total, fail_step = int(sys.argv[-2]), int(sys.argv[-1])
rank = int(os.environ["RANK"])
out = Path(os.environ["OUT_DIR"])
progress = out / f"progress-{rank}.json"
marker = out / "crashed"
start = json.loads(progress.read_text())["step"] if progress.exists() else 0
step = start
for step in range(start + 1, total + 1):
    time.sleep(0.02)  # "train"
    if rank == 1 and step == fail_step and not marker.exists():
        marker.write_text("1")
        print(f"rank {rank}: simulated crash at step {step}", file=sys.stderr, flush=True)
        sys.exit(13)
    tmp = progress.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step}))
    tmp.rename(progress)
(out / f"final-{rank}.json").write_text(
    json.dumps(
        {
            "step": step,
            "resumed_from": start,
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "-1")),
        }
    )
)
