"""Updates on ZeRO-style shards: 1-D, zero-padded slices of every parameter, with ``reduce_fn``.

Two "ranks" run in two threads of one process; ``reduce_fn`` is an all-reduce SUM built on a
barrier, so a transform that needs a norm sees exactly what it would see across processes. The
concatenated shard results must equal the unsharded run, and padding must stay zero.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import optree
import pytest
import torch

from funczero import optim

WORLD = 2
SHAPES = {"emb": (7, 3), "bias": (5,), "odd": (3, 3, 3), "scalar": ()}  # numels 21, 5, 27, 1


class ThreadAllReduce:
    """All-reduce SUM between ``world`` threads; counts calls per rank."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def fn(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce_fn(x: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = x.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total = total + other  # same order on every rank: identical results
            self.barrier.wait()
            return total

        return reduce_fn


def _shard(tree: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tree.items():
        flat = v.reshape(-1)
        padded = -(-flat.numel() // WORLD) * WORLD
        flat = torch.cat([flat, flat.new_zeros(padded - flat.numel())])
        out[k] = flat.chunk(WORLD)[rank].clone()
    return out


def _unshard(shards: list[dict[str, torch.Tensor]], like: dict[str, torch.Tensor]) -> dict:
    out = {}
    for k, v in like.items():
        flat = torch.cat([s[k] for s in shards])
        assert torch.all(flat[v.numel() :] == 0), f"{k}: padding is no longer zero"
        out[k] = flat[: v.numel()].reshape(v.shape)
    return out


def _problem(steps: int) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    grads = [
        {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]
    return params, grads


def _run_full(make, params, grads):
    opt = make()
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params


def _run_sharded(make, params, grads, inplace: bool):
    comm = ThreadAllReduce(WORLD)

    def rank_main(rank: int):
        opt = make()
        p = _shard(params, rank)
        state = opt.init(p)
        reduce_fn = comm.fn(rank)
        for g in grads:
            g = _shard(g, rank)
            if inplace and hasattr(opt, "update_"):
                state = opt.update_(g, state, p, reduce_fn=reduce_fn)
            else:
                updates, state = opt.update(g, state, p, reduce_fn=reduce_fn)
                p = optim.apply_updates(p, updates)
        return p, state

    with ThreadPoolExecutor(WORLD) as pool:
        results = list(pool.map(rank_main, range(WORLD)))
    return [r[0] for r in results], [r[1] for r in results], comm.calls


def _clip_then_sgd() -> optim.GradientTransformation:
    return optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(0.1, 0.9))


MAKERS: dict[str, tuple[Callable, int]] = {  # factory, reduce_fn calls per update
    "lamb": (lambda: optim.lamb(1e-2, weight_decay=0.01), 1),
    "lamb_clamped": (lambda: optim.lamb(1e-1, min_coeff=0.5, max_coeff=1.2), 1),
    "clip_by_global_norm+sgd": (_clip_then_sgd, 1),
    "clip_by_global_norm+lamb": (
        lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.lamb(1e-2)), 2),
    "adamw": (lambda: optim.adamw(1e-2), 0),
    "adam_l2": (lambda: optim.adam(1e-2, weight_decay=0.1), 0),
    "sgd_nesterov": (lambda: optim.sgd(0.1, 0.9, nesterov=True, weight_decay=0.1), 0),
    "lion": (lambda: optim.lion(1e-3, weight_decay=0.1), 0),
    "adagrad": (lambda: optim.adagrad(0.1, initial_accumulator_value=0.1, weight_decay=0.1), 0),
}  # fmt: skip


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_two_shards_with_reduce_fn_equal_the_unsharded_update(name: str, inplace: bool) -> None:
    steps = 6
    make, calls_per_update = MAKERS[name]
    params, grads = _problem(steps)
    expected = _run_full(make, params, grads)
    shards, _, calls = _run_sharded(make, params, grads, inplace)
    got = _unshard(shards, params)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-12)
    # LAMB stacks all per-parameter partial norms into one collective per update.
    assert calls == [calls_per_update * steps] * WORLD


def test_moments_of_padding_stay_zero() -> None:
    params, grads = _problem(3)
    _, states, _ = _run_sharded(lambda: optim.lamb(1e-2, weight_decay=0.1), params, grads, True)
    mu = states[-1][0].mu  # the last rank holds the padding
    nu = states[-1][0].nu
    for k, v in params.items():
        pad = -(-v.numel() // WORLD) * WORLD - v.numel()
        if pad:
            assert torch.all(mu[k][-pad:] == 0) and torch.all(nu[k][-pad:] == 0), k


def test_global_norm_of_shards_equals_norm_of_full_tree() -> None:
    params, _ = _problem(1)
    comm = ThreadAllReduce(WORLD)
    with ThreadPoolExecutor(WORLD) as pool:
        norms = list(pool.map(lambda r: optim.global_norm(_shard(params, r), comm.fn(r)), range(2)))
    expected = torch.linalg.vector_norm(torch.cat([v.reshape(-1) for v in params.values()]))
    for n in norms:
        torch.testing.assert_close(n, expected, rtol=1e-14, atol=0)
    leaves = optree.tree_leaves(norms)
    assert all(x.ndim == 0 for x in leaves)
