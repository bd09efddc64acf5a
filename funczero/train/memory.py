"""How many bytes one rank holds for training, by category, and how to measure the peak.

:func:`memory_breakdown` answers "where does this rank's memory go" for a :class:`TrainState`
and its :class:`~funczero.parallel.ZeroPlan`. Parameters, master weights, optimizer state,
buffers and the rest are read from the state's tensors, counting each *storage* once (so views of
one all-gathered unit buffer are counted once, at the buffer's padded size, and a tensor that is
both ``params[n]`` and ``master[n]`` is not counted twice). Gradients are not part of the state;
their bytes are derived from the plan exactly as :func:`funczero.make_train_step` allocates them
(see :func:`gradient_bytes`).

With ``Ψ`` trainable elements, ``N > 1`` ranks, bf16 compute and one micro-batch per step, the
result is (padding aside; each parameter is padded to a multiple of ``N`` when sharded)::

    stage  params      grads     master   opt_state (AdamW)   total
    0      2Ψ          4Ψ        4Ψ       8Ψ                  18Ψ
    1      2Ψ          4Ψ/N      4Ψ/N     8Ψ/N                2Ψ + 16Ψ/N
    2      2Ψ          4Ψ/N      4Ψ/N     8Ψ/N                2Ψ + 16Ψ/N
    3      (= master)  4Ψ/N      4Ψ/N     8Ψ/N                16Ψ/N

(stage 1 holds ``2Ψ + 4Ψ/N`` of gradients at ``N = 1`` and ``4Ψ + 4Ψ/N`` with accumulation;
see :func:`gradient_bytes`), against DeepSpeed's mixed-precision Adam figures 16Ψ,
4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N and 16Ψ/N (``docs/zero.md`` explains each difference).
:func:`peak_allocated_bytes` measures what a call allocates on top of that (activations,
gathered units, temporaries) with the profiler's memory records, which work on the CPU where
``torch.cuda.max_memory_allocated`` has no counterpart.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> from funczero.module import extract_tensors
    >>> from funczero.parallel.plan import build_plan
    >>> from funczero.train.step import init_state
    >>> model = torch.nn.Linear(10, 10)  # 110 parameters
    >>> plan = build_plan(model, stage=0)
    >>> params, buffers = extract_tensors(model, plan.spec)
    >>> state = init_state(plan, optim.adamw(1e-3), params, buffers)
    >>> mem = memory_breakdown(state, plan)
    >>> mem["master"], mem["params"], mem["grads"], mem["opt_state"]  # fp32: params are master
    (440, 0, 440, 888)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch

from funczero import tree
from funczero.parallel.sharding import Unit
from funczero.parallel.plan import ZeroPlan
from funczero.train.state import TrainState

__all__ = [
    "CATEGORIES",
    "deepspeed_model_state_bytes",
    "gradient_bytes",
    "memory_breakdown",
    "peak_allocated_bytes",
]

CATEGORIES = ("params", "grads", "master", "opt_state", "buffers", "other")
"""Keys of :func:`memory_breakdown` besides ``"total"``, in table order."""


def _storages(tensors: Iterable[Any], seen: set[tuple[str, int]]) -> int:
    """Bytes of the storages behind ``tensors`` not already in ``seen`` (which is updated)."""
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _grad_units(plan: ZeroPlan) -> tuple[Unit, ...]:
    """Units whose reduced gradient shards the step holds (trainable parameters only)."""
    persistent = (plan.persistent_grad_unit,) if plan.persistent_grad_unit is not None else ()
    return plan.grad_units + persistent


def gradient_bytes(plan: ZeroPlan, *, grad_accum: int = 1) -> int:
    """Bytes of gradient buffers one rank holds when ``train_step`` runs the optimizer update.

    This is the gradient memory of :func:`funczero.make_train_step` from the end of the gradient
    reduction until the update (the step's reduced ``grads`` and whatever it still holds of the
    local ones there), for trainable parameters only. With ``c`` the compute dtype's element
    size, ``f`` a parameter's element count and ``S`` a unit's per-rank padded shard size
    (trainable parameters), and "reduced in backward" meaning
    :meth:`~funczero.parallel.stages.Stage.reduces_in_backward` (stages 2-3 always; stages 0-1 when
    ``grad_accum == 1`` and ``N > 1``):

    * stage 0: full fp32 gradients, ``4 * sum(f)``: one all-reduced fp32 buffer per unit when
      reduced in backward, else fp32 copies of the local gradients (the compute-dtype originals
      are freed by then) reduced in place.
    * stage 1 reduced in backward: only the fp32 shards, one ``[S]`` buffer per unit,
      ``4 * sum(S)``. Otherwise the full local gradients stay alive through the update as well:
      in the compute dtype when ``grad_accum == 1`` (``c * sum(f) + 4 * sum(S)``; that is
      ``N = 1``) and as the fp32 accumulator with accumulation (``4 * sum(f) + 4 * sum(S)``).
    * stages 2 and 3: only the fp32 shards reduced during backward, ``4 * sum(S)``; full
      gradients exist one unit at a time inside backward and are not counted.

    With ``reduce_scatter: false`` (``plan.use_all_reduce``), ``N > 1`` and fp32 reduction, each
    unit's shard is a view of its all-reduced ``[N, S]`` buffer, so ``4 * N * S`` per unit is held.
    Transients inside backward (a unit's full gradients, the ``[N, S]`` send buffer) are peak
    memory, measured by :func:`peak_allocated_bytes`, not held memory.

    Args:
        plan: the ZeRO plan.
        grad_accum: micro-batches per step (as given to ``make_train_step``).

    Returns:
        Bytes per rank.
    """
    trainable = plan.trainable
    if not trainable:
        return 0
    full = sum(plan.shard_specs[n].numel for n in trainable)
    keeps_chunks = (
        plan.use_all_reduce and plan.world_size > 1 and plan.precision.reduce_dtype == torch.float32
    )
    per_unit = plan.world_size if keeps_chunks else 1
    shards = sum(4 * gu.shard_numel * per_unit for gu in _grad_units(plan))
    if not plan.master_sharded:
        return 4 * full
    if not plan.policy.reduces_in_backward(single_micro_batch=grad_accum == 1, world_size=plan.world_size):
        compute = plan.precision.compute_dtype.itemsize if grad_accum == 1 else 4
        return compute * full + shards
    return shards


def memory_breakdown(state: TrainState, plan: ZeroPlan, *, grad_accum: int = 1) -> dict[str, int]:
    """Bytes one rank holds for training, by category.

    Keys (all ints, bytes on this rank):

    * ``params``: the compute parameters ``state.params`` not shared with ``master``. At stage 0
      with fp32 and at stage 3 the trainable parameters *are* the master tensors and count 0
      here; at stages 1-2 (after a step) they are views of all-gathered unit buffers, counted at
      the buffers' padded size.
    * ``grads``: gradient buffers held at the optimizer update, derived from the plan by
      :func:`gradient_bytes` (gradients are not part of the state).
    * ``master``: fp32 master weights ``state.master`` (full at stage 0, padded shards after).
    * ``opt_state``: every tensor of the optimizer state (moments and 0-d counters).
    * ``buffers``: module buffers (replicated).
    * ``other``: step, skipped count, loss scale and RNG state.
    * ``total``: the sum of the above.

    Each storage is counted once, in the first category above (in the order master, params,
    opt_state, buffers, other) that references it.

    Args:
        state: this rank's state (not a donated one).
        plan: the plan the state was built with.
        grad_accum: micro-batches per step, for ``grads``.

    Returns:
        ``{"params", "grads", "master", "opt_state", "buffers", "other", "total"}`` in bytes.

    Example:
        >>> import torch
        >>> from funczero import optim
        >>> from funczero.module import extract_tensors
        >>> from funczero.parallel.plan import build_plan
        >>> from funczero.train.step import init_state
        >>> model = torch.nn.Linear(10, 10)
        >>> plan = build_plan(model, stage=3, precision="bf16")
        >>> params, buffers = extract_tensors(model, plan.spec)
        >>> mem = memory_breakdown(init_state(plan, optim.adamw(1e-3), params, buffers), plan)
        >>> mem["params"], mem["master"]  # stage 3: the fp32 shards serve as both
        (0, 440)
    """
    seen: set[tuple[str, int]] = set()
    out = {"master": _storages(state.master.values(), seen)}
    out["params"] = _storages(state.params.values(), seen)
    out["opt_state"] = _storages(tree.leaves(state.opt_state), seen)
    out["buffers"] = _storages(state.buffers.values(), seen)
    extras = [state.step, state.skipped, state.rng, *tree.leaves(state.loss_scale)]
    out["other"] = _storages(extras, seen)
    out["grads"] = gradient_bytes(plan, grad_accum=grad_accum)
    result = {k: out[k] for k in CATEGORIES}
    result["total"] = sum(result.values())
    return result


def deepspeed_model_state_bytes(numel: int, stage: int, world_size: int) -> float:
    """DeepSpeed's mixed-precision Adam model-state memory per rank (ZeRO paper, K = 12).

    ``16Ψ`` (stage 0), ``4Ψ + 12Ψ/N`` (1), ``2Ψ + 14Ψ/N`` (2), ``16Ψ/N`` (3); no padding.

    Example:
        >>> deepspeed_model_state_bytes(1000, 2, 4)
        5500.0
    """
    psi, n = float(numel), world_size
    by_stage = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}
    return by_stage[stage]


def peak_allocated_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak bytes allocated during the call)``.

    The peak is the highest running total of the allocations made inside the call minus their
    frees, per device type, from ``torch.profiler``'s memory records (``profile_memory=True``;
    the method of the feasibility study's ZeRO-3 measurements). Memory that existed before the
    call is invisible to it, including its frees. So to measure a training step's whole peak,
    build the state *inside* ``fn`` (from tensors made outside) and run the steps there: the
    state is then counted, and a step that replaces state tensors is credited for freeing the
    old ones. Measuring only ``lambda: train_step(state, batch)`` gives the step's extra memory
    (activations, gradients, gathered units), over-counted by any state tensors it replaces.
    On CUDA, ``torch.cuda.max_memory_allocated`` is the cheaper measure.

    Args:
        fn: the call to measure.

    Returns:
        ``(fn(), peak_bytes)``.

    Example:
        >>> import torch
        >>> _, peak = peak_allocated_bytes(lambda: torch.ones(1000).sum())
        >>> peak >= 4000
        True
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        result = fn()
    # The exported trace is the one place the records carry addresses. They are needed: the
    # profiler remembers sizes across sessions, so without matching, a block allocated under an
    # earlier profile and its address reused since would show up here as a spurious free.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            trace = json.load(f)
    records = [e for e in trace.get("traceEvents", []) if e.get("name") == "[memory]"]
    live: dict[tuple[Any, int], int] = {}
    running: dict[Any, int] = {}
    peaks: dict[Any, int] = {}
    for e in sorted(records, key=lambda e: float(e.get("ts", 0.0))):
        args = e["args"]
        device, nbytes = args.get("Device Type"), int(args["Bytes"])
        key = (device, int(args["Addr"]))
        if nbytes > 0:
            live[key] = nbytes
        elif key in live:
            nbytes = -live.pop(key)
        else:  # allocated before this call
            continue
        running[device] = running.get(device, 0) + nbytes
        peaks[device] = max(peaks.get(device, 0), running[device])
    return result, max(peaks.values(), default=0)
