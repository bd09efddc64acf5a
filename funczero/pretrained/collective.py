"""What the collective operations of ``funczero.pretrained`` share: the rank checks and the
agreement that makes every rank raise when one fails (so none waits alone in a collective).

Example:
    >>> import torch
    >>> from funczero.testing.states import toy_state
    >>> state_device(toy_state())
    device(type='cpu')
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from funczero.train.state import StateLayout, TrainState

__all__ = ["agree", "check_world", "state_device"]


def state_device(state: TrainState) -> torch.device:
    """Where the state's tensors live (what a collective about it runs on)."""
    return state.step.device


def check_world(layout: StateLayout, group: Any) -> None:
    """Raise unless this process is the rank of ``group`` the state was built for."""
    if layout.world_size == 1:
        return
    if not dist.is_initialized():
        raise RuntimeError(
            f"the state spans {layout.world_size} ranks but torch.distributed is not "
            "initialised; call this on every rank of the job that built the state"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if (world, rank) != (layout.world_size, layout.rank):
        raise ValueError(
            f"the state was built for rank {layout.rank} of {layout.world_size}, but this "
            f"process is rank {rank} of {world} in the group; pass plan= (the state's plan) "
            "so its process group is used"
        )


def agree(
    failure: BaseException | None,
    layout: StateLayout,
    group: Any,
    device: torch.device,
    *,
    what: str,
) -> None:
    """Raise on every rank if any failed (one all-reduce), so no rank goes on alone.

    ``failure`` is this rank's exception (re-raised here) or None; ``what`` names the operation
    in the error of the ranks that did not fail themselves.
    """
    if layout.world_size > 1 and dist.is_initialized():
        failed = torch.tensor([int(failure is not None)], dtype=torch.int32, device=device)
        dist.all_reduce(failed, group=group)
        others = int(failed.item()) - int(failure is not None)
        if failure is None and others:
            raise RuntimeError(
                f"{what} failed on {others} other rank(s) (their errors say why); this rank "
                "stopped too, so every rank raises together"
            )
    if failure is not None:
        raise failure
