"""Shared test fixtures: gloo worlds of CPU ranks and tiny models and states.

``gloo_world`` runs a module-level function on N spawned CPU ranks with a hard timeout and
returns what each rank reported, so the test compares it with a single-process reference in the
pytest process (where a failed comparison prints a readable diff). Spawning ranks costs seconds
on a loaded machine: batch several checks into one world.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from funczero.models.gpt import GPT, GPTConfig
from funczero.parallel.sharding import ShardSpec
from funczero.testing.distributed import run_distributed
from funczero.testing.states import toy_state as _toy_state

# One intra-op thread in the pytest process: on a shared 2-core machine, 2 threads per process
# collapse (measured 6x slower) and spawned ranks already add processes. Spawned ranks set their
# own (funczero.testing.distributed).
torch.set_num_threads(1)

Report = dict[str, torch.Tensor]
WorldRunner = Callable[..., list[Report]]

# Sizes that need padding at world sizes 2-4 (vocab 13, d_model 6, 3 * d_model = 18 ...).
TINY_GPT = GPTConfig(vocab_size=13, seq_len=5, d_model=6, n_layers=2, n_heads=2)


def make_tiny_gpt(seed: int = 0, **overrides: Any) -> GPT:
    """A 2-block GPT with fixed initial weights (``seed``); ``overrides`` replace config fields."""
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(TINY_GPT, **overrides))


def make_tiny_batch(seed: int = 1, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token targets for :func:`make_tiny_gpt`."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, TINY_GPT.seq_len)
    return (
        torch.randint(0, TINY_GPT.vocab_size, shape, generator=g),
        torch.randint(0, TINY_GPT.vocab_size, shape, generator=g),
    )


def shard_tree(tree: Mapping[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """``rank``'s flat, zero-padded ZeRO shard of every tensor (``ShardSpec.shard``)."""
    return {k: ShardSpec(k, v.shape, world_size).shard(v, rank) for k, v in tree.items()}


def thread_all_reduce(world_size: int) -> Callable[[int], Callable[[torch.Tensor], torch.Tensor]]:
    """``for_rank(rank) -> reduce_fn``: a sum over ``world_size`` threads (one per rank), for
    optimizer tests that run ZeRO shards in threads instead of processes."""
    barrier, slots = threading.Barrier(world_size), [None] * world_size

    def for_rank(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce_fn(x: torch.Tensor) -> torch.Tensor:
            slots[rank] = x.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0])
            barrier.wait()
            return total

        return reduce_fn

    return for_rank


def _report_rank(
    rank: int,
    world_size: int,
    fn: Callable[..., Mapping[str, torch.Tensor] | None],
    out: str,
    *args: Any,
) -> None:
    # Spawned ranks cannot return objects; they write safetensors (no pickle) the test reads back.
    report = fn(rank, world_size, *args) or {}
    tensors = {k: v.detach().clone().contiguous() for k, v in report.items()}
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))


@pytest.fixture(scope="session")
def gloo_world(tmp_path_factory: pytest.TempPathFactory) -> WorldRunner:
    """``run(fn, world_size, *args, timeout=120.0) -> [report of rank 0, ...]``.

    ``fn(rank, world_size, *args)`` must be defined at module level (spawned ranks import it by
    name); it runs with the default gloo group initialised and returns a dict of tensors (or
    None). A rank that raises or a world that hangs past ``timeout`` fails the test. Session
    scoped, so a module-scoped fixture can run one world for several tests.
    """

    def run(
        fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
    ) -> list[Report]:
        out = tmp_path_factory.mktemp(f"world-{fn.__name__}")
        try:
            run_distributed(_report_rank, world_size, fn, str(out), *args, timeout=timeout)
        except (RuntimeError, TimeoutError) as e:
            # Name the test's function, not the reporting wrapper every world runs.
            where = f"{fn.__module__}.{fn.__name__}"
            raise type(e)(f"{where}: {e} (ranks' tracebacks: captured stderr)") from e
        return [load_file(out / f"rank{r}.safetensors") for r in range(world_size)]

    return run


@pytest.fixture
def tiny_model() -> Callable[..., GPT]:
    """Factory of tiny GPTs: ``tiny_model(seed=0, **config_overrides)``."""
    return make_tiny_gpt


@pytest.fixture
def tiny_batch() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Factory of ``(ids, targets)`` batches for the tiny GPT: ``tiny_batch(seed=1, batch=4)``."""
    return make_tiny_batch


@pytest.fixture
def toy_state() -> Callable[..., Any]:
    """:func:`funczero.testing.states.toy_state`: a hand-built state for any layout."""
    return _toy_state
