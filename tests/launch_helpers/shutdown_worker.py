"""Checks funczero.parallel.env.shutdown() inside a real 2-rank job.

shutdown() destroys the group init_distributed created, is idempotent, and leaves
alone a group the script created itself (the exit hook too). Prints "checks passed".
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from funczero.parallel import env

env.init_distributed()
dist.all_reduce(torch.ones(1))
env.shutdown()
assert not dist.is_initialized()
env.shutdown()  # idempotent
dist.init_process_group("gloo")  # the script's own group (env://, a new store)
env.shutdown()
assert dist.is_initialized(), "shutdown() destroyed a group it did not create"
dist.all_reduce(torch.ones(1))
dist.destroy_process_group()
print("checks passed", flush=True)
