"""Trivial 2-rank job: join the group with funczero.init_distributed, all-reduce, exit.

No teardown of its own: the group init_distributed created must be torn down at exit
by funczero (before that, gloo sometimes aborted the finished process with exit 134).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from funczero.parallel.env import init_distributed

init_distributed()
total = torch.ones(1)
dist.all_reduce(total)
assert total.item() == dist.get_world_size()
print(f"rank {dist.get_rank()} done", flush=True)
