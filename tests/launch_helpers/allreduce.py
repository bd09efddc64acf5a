"""Worker that joins a gloo process group from the launcher's env and all-reduces.

Writes ``$OUT_DIR/allreduce-<RANK>.json`` = {"rank", "world_size", "sum"} where
``sum`` is the all-reduce of ``rank + 1`` over the group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("gloo")  # env:// : RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
record = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "sum": value.item()}
Path(os.environ["OUT_DIR"], f"allreduce-{dist.get_rank()}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
