"""``funczero.initialize``: a DeepSpeed config and a module in, a state and a step out.

Example:
    >>> import torch, funczero
    >>> model = torch.nn.Linear(4, 1)
    >>> config = {"train_micro_batch_size_per_gpu": 2,
    ...           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    >>> run = funczero.initialize(model, config, loss_fn)
    >>> state, metrics = run.train_step(run.state, (torch.ones(2, 4), torch.zeros(2, 1)))
    >>> int(state.step)
    1
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from funczero.config import Config
from funczero.data import DistributedBatchLoader
from funczero.from_config import (
    loss_scale_from_config,
    offload_from_config,
    optimizer_from_config,
    precision_from_config,
    shard_group_size_from_config,
)
from funczero.monitors.timing import PhaseTimer
from funczero.module import InitFn, extract_tensors, guard_released, is_meta, release_module_tensors
from funczero.parallel.env import init_distributed
from funczero.parallel.plan import Remat, ZeroPlan, build_plan
from funczero.train.state import TrainState
from funczero.parallel.compile import CompileOptions
from funczero.train.step import TrainStep, init_state, make_train_step

__all__ = ["Initialized", "initialize"]


class Initialized(NamedTuple):
    """What :func:`initialize` returns (unpack it, or use the fields)."""

    state: TrainState
    train_step: TrainStep
    loader: DistributedBatchLoader | None
    plan: ZeroPlan
    config: Config
    optimizer: Any
    timer: Any = None
    """The step's :class:`~funczero.monitors.timing.PhaseTimer` when the config asks for
    ``wall_clock_breakdown`` (give it to :class:`funczero.train.metrics.MetricsLogger`), else None."""


def initialize(
    model: nn.Module,
    config: Config | Mapping[str, Any] | str | os.PathLike[str],
    loss_fn: Callable[[Callable[..., Any], Any], Any],
    *,
    optimizer: Any = None,
    training_data: Any = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    seed: int | None = None,
    wrap: Sequence[str] | Callable[[nn.Module], list[str]] | None = None,
    remat: Remat | None = None,
    init_fn: InitFn | None = None,
    init_from: str | os.PathLike[str] | None = None,
    donate: bool = True,
    device: torch.device | str | None = None,
    compile: bool | CompileOptions | None = None,
) -> Initialized:
    """Build the training state and step from a DeepSpeed-style config.

    Initialises the process group from the environment (a plain ``python`` run is world size
    1), plans ZeRO from ``zero_optimization``, moves the model's weights into the state (the
    module keeps only structure), and builds the optimizer and schedule from the config unless
    ``optimizer`` is given.

    Args:
        model: the module; every rank must build it with the same initial weights (same seed).
            A model built on the meta device (``with torch.device("meta"): model = ...``) is
            created here one module at a time, each rank keeping only its part (see
            :func:`funczero.module.materialize`): seed the global RNG before the call.
        config: a :class:`Config`, a DeepSpeed JSON dict, or a path to a JSON file.
        loss_fn: ``loss_fn(model, micro_batch) -> loss`` (or ``(loss, aux)``).
        optimizer: a funczero optimizer to use instead of the config's ``optimizer`` block.
        training_data: a map-style dataset; when given, a :class:`DistributedBatchLoader`
            yielding this rank's per-step batches is returned.
        collate_fn: how the loader stacks samples (default: stack tensors).
        seed: RNG seed for dropout and data order (default ``funczero.seed`` or 0).
        wrap: ZeRO-3 units (module FQNs) or a policy; default: every transformer block.
        remat: activation checkpointing per unit, at any stage: True (every unit), every k-th
            unit (an int), unit names, or a predicate on a unit's name. Default: every unit
            when the config has an ``activation_checkpointing`` block, else none.
        init_fn: for a meta-device model, initialises one module's own tensors (default: the
            model's ``_init_weights(module)``, else each module's ``reset_parameters()``).
        init_from: start from pretrained weights: a Hugging Face ``model.safetensors`` (or its
            sharded index), funczero's consolidated output, or a funczero checkpoint's weights;
            each rank reads only its own shards (:func:`funczero.pretrained.load_pretrained`,
            strict). Build the model on the meta device to skip creating random weights.
        donate: let each step reuse the previous state's buffers in place.
        device: where the state lives (default: the current CUDA device, else CPU).
        compile: compile each unit's forward inside the step (``True`` or a
            :class:`~funczero.parallel.compile.CompileOptions`; False: eager). Default: the
            config's ``compile`` block (DeepSpeed's ``{"enabled", "backend", "kwargs"}``).
    """
    topo = init_distributed()
    cfg = config if isinstance(config, Config) else Config.load(config, world_size=topo.world_size)
    if cfg.world_size != topo.world_size:
        raise ValueError(
            f"config was resolved for world_size={cfg.world_size} but this job has "
            f"{topo.world_size} ranks; load it with Config.load(..., world_size={topo.world_size})"
        )
    seed = seed if seed is not None else (cfg.funczero.seed or 0)
    offload = offload_from_config(cfg)  # refuses stage 0 before any work
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    plan = build_plan(
        model,
        stage=cfg.zero.stage,
        precision=precision_from_config(cfg),
        wrap=wrap,
        param_persistence_threshold=cfg.zero.stage3_param_persistence_threshold,
        reduce_scatter=cfg.zero.reduce_scatter,
        reduce_bucket_size=cfg.zero.reduce_bucket_size,
        remat=remat if remat is not None else cfg.activation_checkpointing is not None,
        shard_group_size=shard_group_size_from_config(cfg),
    )
    if plan.policy.params_at_rest == "shard" and not any(plan.is_sharded(n) for n in plan.spec.params):
        warnings.warn(
            f"ZeRO stage 3 shards nothing: every parameter has fewer than "
            f"stage3_param_persistence_threshold={cfg.zero.stage3_param_persistence_threshold} "
            "elements, so all stay replicated (as stage 2); lower the threshold to shard them",
            stacklevel=2,
        )
    # Masks decided from global shapes, so they hold at stage 3 where a rank sees only shards.
    opt = optimizer if optimizer is not None else optimizer_from_config(cfg, shapes=plan.spec.shapes)
    loss_scale = loss_scale_from_config(cfg)
    if is_meta(model):
        state = init_state(
            plan, opt, init_fn=init_fn, seed=seed, loss_scale=loss_scale, device=device,
            offload=offload,
        )  # fmt: skip
        guard_released(model)
    else:
        params, buffers = extract_tensors(model, plan.spec)
        release_module_tensors(model)
        state = init_state(
            plan, opt, params, buffers, seed=seed, loss_scale=loss_scale, device=device,
            offload=offload,
        )  # fmt: skip
        del params
    if init_from is not None:
        from funczero.pretrained import load_pretrained

        state = load_pretrained(state, init_from, plan=plan, donate=True)
    timer = PhaseTimer(device) if cfg.monitors.wall_clock_breakdown else None
    step = make_train_step(
        loss_fn,
        opt,
        plan,
        grad_accum=cfg.gradient_accumulation_steps,
        gradient_clipping=cfg.gradient_clipping,
        loss_scale=loss_scale,
        donate=donate,
        timer=timer,
        offload=offload,
        compile=compile if compile is not None else CompileOptions.from_config(cfg.compile),
    )
    loader = None
    if training_data is not None:
        loader = DistributedBatchLoader(
            training_data,
            micro_batch_size=cfg.train_micro_batch_size_per_gpu,
            grad_accum=cfg.gradient_accumulation_steps,
            rank=topo.rank,
            world_size=topo.world_size,
            seed=seed,
            drop_last=cfg.dataloader_drop_last,
            collate_fn=collate_fn,
        )
    return Initialized(state, step, loader, plan, cfg, opt, timer)
