"""``make_train_step``: the pure training step, composed from the ZeRO stage functions.

One call of ``train_step(state, batch)``:

1. splits ``batch`` into ``grad_accum`` micro-batches along dim 0;
2. for each, runs the model and differentiates ``loss * loss_scale / grad_accum``
   (:func:`funczero.parallel.zero.forward_backward`), accumulating gradients;
3. reduces gradients over ranks into their update layout (:func:`~funczero.parallel.zero.reduce_grads`);
4. with one scalar all-reduce, gets the global gradient norm, the inf/nan flag and the loss;
5. unscales and clips in one multiply, and updates the master weights (fused in place when the
   state is donated), leaving everything untouched when gradients were not finite;
6. rebuilds the compute-dtype parameters (:func:`~funczero.parallel.zero.gather_params_after_update`)
   and updates the loss scale.

Nothing in it reads a tensor on the host, so the step never synchronises with the device; the
metrics are 0-d tensors to read when logging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from funczero import tree
from funczero.train.loss_scale import LossScaleConfig, at_min_scale, init_loss_scale, update_loss_scale
from funczero.parallel import zero
from funczero.parallel.zero import ZeroPlan
from funczero.train.rng import init_rng, rng_scope
from funczero.train.state import DonatedStateError, TrainState

__all__ = ["init_state", "make_train_step", "split_micro_batches"]

Metrics = dict[str, torch.Tensor]
TrainStep = Callable[[TrainState, Any], tuple[TrainState, Metrics]]


def _device_of(tensors: Mapping[str, torch.Tensor]) -> torch.device:
    for t in tensors.values():
        return t.device
    return torch.device("cpu")


def init_state(
    plan: ZeroPlan,
    optimizer: Any,
    full_params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    loss_scale: LossScaleConfig | None = None,
    device: torch.device | str | None = None,
) -> TrainState:
    """Build this rank's initial :class:`TrainState` from full parameters.

    Args:
        plan: the ZeRO plan (stage, precision, layout).
        optimizer: a :class:`funczero.optim.GradientTransformation`.
        full_params: every canonical parameter at full size (e.g. from the module); identical on
            all ranks (same seed), each rank keeps its part.
        buffers: module buffers.
        seed: seed of the state's RNG (rank ``r`` uses ``seed + r``).
        loss_scale: fp16 loss-scaler settings (default: no scaling).
        device: where the state lives (default: the parameters' device).
    """
    device = torch.device(device) if device is not None else _device_of(full_params)
    full = {n: full_params[n].to(device) for n in plan.spec.params}
    params, master = zero.init_params(plan, full)
    opt_state = optimizer.init({n: master[n] for n in plan.trainable})
    ls_cfg = loss_scale or LossScaleConfig.disabled()
    return TrainState.create(
        stage=plan.stage,
        world_size=plan.world_size,
        rank=plan.rank,
        precision=plan.precision.name,
        shapes={n: tuple(plan.spec.shapes[n]) for n in plan.spec.params},
        trainable=plan.trainable,
        sharded_params=[n for n in plan.spec.params if plan.is_sharded(n)],
        aliases=tuple((a, c) for a, c in plan.spec.aliases.items() if a != c),
        step=torch.zeros((), dtype=torch.int64, device=device),
        params=params,
        master=master,
        opt_state=opt_state,
        loss_scale=init_loss_scale(ls_cfg, device=device),
        buffers={n: b.detach().to(device).clone() for n, b in buffers.items()},
        rng=init_rng(seed, device=device, rank=plan.rank),
        skipped=torch.zeros((), dtype=torch.int64, device=device),
    )


def split_micro_batches(batch: Any, n: int) -> list[Any]:
    """Split every tensor of ``batch`` into ``n`` equal parts along dim 0."""
    if n == 1:
        return [batch]
    leaves, spec = tree.flatten(batch)
    for path, leaf in tree.leaves_with_path(batch):
        if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] % n):
            raise ValueError(
                f"batch/{path}: leading size {tuple(leaf.shape)[:1]} is not divisible by "
                f"gradient_accumulation_steps={n}; the per-rank batch must hold "
                "micro_batch_size * gradient_accumulation_steps samples"
            )
    parts = [leaf.chunk(n) if isinstance(leaf, torch.Tensor) else [leaf] * n for leaf in leaves]
    return [tree.unflatten(spec, [p[i] for p in parts]) for i in range(n)]


def _where_tree(found_inf: torch.Tensor, old: Any, new: Any) -> Any:
    return tree.map(lambda o, n: torch.where(found_inf, o, n), old, new)


def make_train_step(
    loss_fn: Callable[[Callable[..., Any], Any], Any],
    optimizer: Any,
    plan: ZeroPlan,
    *,
    grad_accum: int = 1,
    gradient_clipping: float = 0.0,
    loss_scale: LossScaleConfig | None = None,
    donate: bool = True,
) -> TrainStep:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    Args:
        loss_fn: ``loss_fn(model, micro_batch) -> loss`` or ``(loss, aux)``, where ``model(*args)``
            runs the module on the step's parameters. Compute the loss in fp32 (e.g.
            ``logits.float()``) so bf16 runs do not quantise it.
        optimizer: a :class:`funczero.optim.GradientTransformation`; its in-place
            ``update_`` is used when present and ``donate`` is set.
        plan: the ZeRO plan from :func:`funczero.parallel.zero.build_plan`.
        grad_accum: micro-batches per step (the batch's dim 0 is split in this many parts).
        gradient_clipping: clip the global gradient norm to this value (0 disables).
        loss_scale: fp16 dynamic loss scaling settings (ignored unless set).
        donate: reuse the old state's buffers in place (faster; the old state becomes unusable).

    Returns:
        The step function. Metrics are 0-d tensors: ``loss`` (mean over the global batch),
        ``grad_norm`` (before clipping), ``lr``, ``loss_scale`` (used for this step) and
        ``skipped`` (1 when gradients were not finite and nothing was updated); with dynamic
        loss scaling also ``overflow_at_min_scale`` (read by :func:`funczero.train.metrics.read_metrics`,
        which warns or raises, since the step itself never syncs).

    Example:
        >>> import torch, funczero
        >>> from funczero.parallel.zero import build_plan
        >>> model = torch.nn.Linear(3, 1)
        >>> plan = build_plan(model, stage=0)
        >>> params, buffers = funczero.module.extract_tensors(model, plan.spec)
        >>> opt = funczero.optim.sgd(0.1)
        >>> state = init_state(plan, opt, params, buffers)
        >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> step = make_train_step(loss_fn, opt, plan)
        >>> state, metrics = step(state, (torch.ones(4, 3), torch.zeros(4, 1)))
        >>> int(state.step)
        1
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum} must be >= 1")
    if gradient_clipping < 0:
        raise ValueError(f"gradient_clipping={gradient_clipping} must be >= 0 (0 disables)")
    ls_cfg = loss_scale or LossScaleConfig.disabled()
    in_place = donate and getattr(optimizer, "update_", None) is not None
    trainable = plan.trainable
    lr_of = getattr(optimizer, "learning_rate", None)
    # With nothing to accumulate, every stage reduces each unit's gradients during backward
    # (overlapped with the next unit's backward) instead of all at once afterwards.
    reduced = zero.reduces_in_backward(plan, grad_accum == 1)
    # A constant loss scale of 1 and no clipping make the unscale/clip multiply the identity:
    # skip it (a read and a write of every gradient).
    unit_coef = not ls_cfg.dynamic and ls_cfg.init_scale == 1.0 and gradient_clipping == 0

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if state.donated:
            raise DonatedStateError(
                "train_step got a state that was already donated to an earlier step; "
                "pass the state returned by the previous call"
            )
        params, master, buffers = state.params, state.master, state.buffers
        device = state.step.device
        scale = state.loss_scale.scale
        multiplier = scale / grad_accum
        acc: dict[str, torch.Tensor] | None = None
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        aux = None
        with rng_scope(state.rng, device) as rng:
            for micro in split_micro_batches(batch, grad_accum):
                loss, aux, grads, buffers = zero.forward_backward(
                    plan, loss_fn, params, master, buffers, micro, multiplier,
                    reduce=grad_accum == 1,
                )  # fmt: skip
                loss_sum = loss_sum + loss.float()
                if acc is None:
                    # Stage 1-3 reduce straight from the first gradients when nothing accumulates;
                    # stage 0 all-reduces in place, so it needs fp32 tensors of its own.
                    pass_through = grad_accum == 1 and (plan.stage != 0 or reduced)
                    # Converting one gradient at a time and dropping each compute-dtype original
                    # as it goes keeps the bf16 and fp32 copies of all gradients from coexisting
                    # (2 bytes per parameter less at the step's peak).
                    acc = grads if pass_through else {n: grads.pop(n).float() for n in list(grads)}
                else:
                    torch._foreach_add_(list(acc.values()), [grads[n] for n in acc])
        assert acc is not None
        grads = acc if reduced else zero.reduce_grads(plan, acc)
        grads = {n: g.float() for n, g in grads.items()}

        # One all-reduce of [sum of squares, loss]: the norm, the inf/nan flag and the metric.
        glist = [grads[n] for n in trainable]
        sq = (
            torch.stack(torch._foreach_norm(glist)).float().pow(2).sum()
            if glist
            else torch.zeros((), device=device)
        )
        if not plan.master_sharded:
            sq = sq / plan.world_size  # replicated gradients: every rank holds the whole norm
        totals = torch.stack([sq, loss_sum / grad_accum])
        if plan.world_size > 1:
            torch.distributed.all_reduce(totals, group=plan.group)
        found_inf = ~torch.isfinite(totals[0])
        grad_norm = totals[0].sqrt() / scale
        mean_loss = totals[1] / plan.world_size
        coef = 1.0 / scale
        if gradient_clipping > 0:
            coef = coef * torch.clamp(gradient_clipping / (grad_norm + 1e-6), max=1.0)
        if glist and not unit_coef:
            torch._foreach_mul_(glist, coef)

        lr = lr_of(state.opt_state) if lr_of is not None else torch.zeros((), device=device)
        train_master = {n: master[n] for n in trainable}
        if in_place:
            opt_state = optimizer.update_(
                grads, state.opt_state, train_master,
                found_inf=found_inf.float(), reduce_fn=plan.reduce_fn,
            )
            new_master = dict(master)
        else:
            updates, opt_state = optimizer.update(
                grads, state.opt_state, train_master, reduce_fn=plan.reduce_fn
            )
            stepped = {
                n: (train_master[n] + updates[n].to(train_master[n].dtype)) for n in trainable
            }
            new_master = {**master, **_where_tree(found_inf, train_master, stepped)}
            opt_state = _where_tree(found_inf, state.opt_state, opt_state)
            # keep the params/master aliasing of init_params (stage 0 fp32)
            params = {n: new_master[n] if p is master.get(n) else p for n, p in params.items()}
        # The gradients are spent: free them before the parameters are rebuilt, which allocates
        # new compute-dtype parameters at stages 1-2 (the two need not coexist).
        del grads, glist, acc
        if in_place and plan.stage == 0:
            # Donated: cast the updated master weights into the old compute-dtype parameters in
            # place instead of allocating new ones (first touches of fresh memory are slow).
            casts = [n for n in trainable if params[n] is not new_master[n]]
            if casts:
                torch._foreach_copy_([params[n] for n in casts], [new_master[n] for n in casts])
            new_params = dict(params)
        else:
            new_params = zero.gather_params_after_update(plan, params, new_master)
        buffers = zero.sync_buffers(plan, dict(buffers))
        skipped = found_inf.to(torch.int64)
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            master=new_master,
            opt_state=opt_state,
            loss_scale=update_loss_scale(state.loss_scale, found_inf, ls_cfg),
            buffers=buffers,
            rng=rng.new_state,
            skipped=state.skipped + skipped,
        )
        metrics = {
            "loss": mean_loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "loss_scale": scale,
            "skipped": skipped,
        }
        if ls_cfg.dynamic:
            metrics["overflow_at_min_scale"] = found_inf & at_min_scale(state.loss_scale, ls_cfg)
        if aux is not None:
            metrics["aux"] = aux
        if donate:
            state.mark_donated()
        return new_state, metrics

    return train_step
