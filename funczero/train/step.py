"""``make_train_step``: the pure training step, composed from the ZeRO stage functions.

One call of ``train_step(state, batch)``:

1. splits ``batch`` into ``grad_accum`` micro-batches along dim 0;
2. for each, runs the model and differentiates ``loss * loss_scale / grad_accum``
   (:func:`funczero.parallel.forward_backward.forward_backward`), accumulating gradients;
3. reduces gradients over ranks into their update layout: during backward, or at the end with
   the stage's ``reduce_grads`` (:mod:`funczero.parallel.stages`);
4. with one scalar all-reduce, gets the global gradient norm, the inf/nan flag and the loss;
5. unscales and clips in one multiply, and updates the master weights (fused in place when the
   state is donated), leaving everything untouched when gradients were not finite;
6. rebuilds the compute-dtype parameters with the stage's ``rebuild_params`` and updates the
   loss scale.

The step reads its plan's stage only through the stage's policy row
(:class:`~funczero.parallel.stages.Stage`): it never compares stage numbers.

Nothing in it reads a tensor on the host, so the step never synchronises with the device; the
metrics are 0-d tensors to read when logging.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from funczero import tree
from funczero.loss import MicroBatches
from funczero.monitors.timing import NullTimer
from funczero.optim.chain import in_place_unsupported_reason
from funczero.optim.clipping import clip_coefficient
from funczero.parallel.collectives import StepCounter, all_reduce_labelled
from funczero.parallel.compile import CompileOptions, UnitForwards, compile_unit_forwards, resolve_compile
from funczero.parallel.forward_backward import PrefetchOrder, forward_backward
from funczero.parallel.plan import ZeroPlan
from funczero.parallel.stages import sync_buffers
from funczero.train.loss_scale import LossScaleConfig, at_min_scale, update_loss_scale
from funczero.train.offload import OffloadedUpdate, OptimizerOffload
from funczero.train.rng import rng_scope
from funczero.train.state import DonatedStateError, TrainState, init_state

__all__ = ["init_state", "make_train_step", "split_micro_batches"]

Metrics = dict[str, torch.Tensor]
TrainStep = Callable[[TrainState, Any], tuple[TrainState, Metrics]]


def split_micro_batches(batch: Any, n: int) -> list[Any]:
    """Split every tensor of ``batch`` into ``n`` equal parts along dim 0.

    A :class:`~funczero.loss.MicroBatches` is already split: it must hold ``n`` micro-batches.
    """
    if isinstance(batch, MicroBatches):
        if len(batch) != n:
            raise ValueError(
                f"MicroBatches holds {len(batch)} micro-batches but gradient_accumulation_steps={n}; "
                "pass exactly one per accumulation step"
            )
        return list(batch)
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
    timer: Any = None,
    compile: bool | CompileOptions | None = None,
    offload: OptimizerOffload | None = None,
) -> TrainStep:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    Args:
        loss_fn: ``loss_fn(model, micro_batch) -> loss`` or ``(loss, aux)``, where ``model(*args)``
            runs the module on the step's parameters. Compute the loss in fp32 (e.g.
            ``logits.float()``) so bf16 runs do not quantise it.
        optimizer: a :class:`funczero.optim.GradientTransformation`; its in-place
            ``update_`` is used when present and ``donate`` is set.
        plan: the ZeRO plan from :func:`funczero.parallel.plan.build_plan`.
        grad_accum: micro-batches per step (the batch's dim 0 is split in this many parts).
        gradient_clipping: clip the global gradient norm to this value (0 disables).
        loss_scale: fp16 dynamic loss scaling settings (ignored unless set).
        donate: reuse the old state's buffers in place (faster; the old state becomes unusable).
        timer: records the ``forward``, ``backward``, ``reduce`` and ``optimizer`` phases of each
            step without a host sync (DeepSpeed's ``wall_clock_breakdown``; a
            :class:`funczero.monitors.timing.PhaseTimer`), or None.
        compile: compile each unit's forward (regional compilation, one graph per unit type;
            :mod:`funczero.parallel.compile`): ``True``, a
            :class:`~funczero.parallel.compile.CompileOptions`, or None/False for eager.
        offload: run the optimizer on the host (ZeRO-Offload, stages 1-3; see
            :mod:`funczero.train.offload`); the state must be built with the same setting.

    Returns:
        The step function. Metrics are 0-d tensors: ``loss`` (mean over the global batch),
        ``grad_norm`` (before clipping), ``lr``, ``loss_scale`` (used for this step) and
        ``skipped`` (1 when gradients were not finite and nothing was updated); with dynamic
        loss scaling also ``overflow_at_min_scale`` (read by :func:`funczero.train.metrics.read_metrics`,
        which warns or raises, since the step itself never syncs).

    Example:
        >>> import torch, funczero
        >>> from funczero.parallel.plan import build_plan
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
    update: _Update | OffloadedUpdate = _make_update(optimizer, plan, donate=donate)
    if offload is not None:
        update = OffloadedUpdate(update, plan, offload)
    policy = plan.policy
    single = grad_accum == 1
    reduced = policy.reduces_in_backward(single_micro_batch=single, world_size=plan.world_size)
    # The first micro-batch's gradients become the accumulator unless something writes into it:
    # later micro-batches, or a reduction in place at the boundary.
    own_accumulator = not single or policy.keeps_accumulator_apart(reduced_in_backward=reduced)
    # A constant loss scale of 1 and no clipping make the unscale/clip multiply the identity:
    # skip it (a read and a write of every gradient).
    unit_coef = not ls_cfg.dynamic and ls_cfg.init_scale == 1.0 and gradient_clipping == 0
    order = PrefetchOrder()  # stage 3 learns the units' order from each forward, for the next
    steps = StepCounter()  # host-side step numbers for collectives' errors (no device sync)
    compiled = compile_unit_forwards(plan.module, plan.wrapped, resolve_compile(compile))
    timer = timer if timer is not None else NullTimer()

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        with steps.scope():
            return _train_step(state, batch)

    def _train_step(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if state.donated:
            raise DonatedStateError(
                "train_step got a state that was already donated to an earlier step; "
                "pass the state returned by the previous call"
            )
        scale = state.loss_scale.scale
        # Offloaded master weights are on the host: the unit boundaries differentiate device
        # stand-ins of their shapes instead.
        anchors = update.anchors(state, state.step.device)
        with rng_scope(state.rng, state.step.device) as rng:
            loss_sum, count, aux, acc, buffers = _accumulate(
                plan, loss_fn, state, anchors, batch, scale / grad_accum, grad_accum,
                own_accumulator=own_accumulator, order=order, timer=timer, compiled=compiled,
            )  # fmt: skip
        grads = acc
        if not reduced:
            with timer.phase("reduce"):
                grads = policy.reduce_grads(plan, acc)
        timer.start("optimizer")
        grads = {n: g.float() for n, g in grads.items()}
        glist = [grads[n] for n in plan.trainable]
        found_inf, grad_norm, mean_loss, grad_scale = _norm_and_loss(
            plan, glist, loss_sum, count, scale, grad_accum
        )
        coef = 1.0 / grad_scale
        if gradient_clipping > 0:
            coef = coef * clip_coefficient(grad_norm, gradient_clipping)
        if glist and (count is not None or not unit_coef):
            torch._foreach_mul_(glist, coef)
        lr, params, master, opt_state = update(state, grads, found_inf)
        # The gradients are spent: free them before the parameters are rebuilt, which allocates
        # new compute-dtype parameters at stages 1-2 (the two need not coexist).
        del grads, glist, acc
        new_params = update.rebuild_params(params, master)
        timer.stop("optimizer")
        timer.end_step()
        skipped = found_inf.to(torch.int64)
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            master=master,
            opt_state=opt_state,
            loss_scale=update_loss_scale(state.loss_scale, found_inf, ls_cfg),
            buffers=sync_buffers(plan, dict(buffers)),
            rng=rng.new_state,
            skipped=state.skipped + skipped,
        )
        metrics = {"loss": mean_loss, "grad_norm": grad_norm, "lr": lr, "loss_scale": scale, "skipped": skipped}
        if ls_cfg.dynamic:
            metrics["overflow_at_min_scale"] = found_inf & at_min_scale(state.loss_scale, ls_cfg)
        if aux is not None:
            metrics["aux"] = aux
        if donate:
            state.mark_donated()
        return new_state, metrics

    return train_step


def _accumulate(
    plan: ZeroPlan,
    loss_fn: Callable[[Callable[..., Any], Any], Any],
    state: TrainState,
    anchors: dict[str, torch.Tensor],
    batch: Any,
    multiplier: torch.Tensor,
    grad_accum: int,
    *,
    own_accumulator: bool,
    order: PrefetchOrder,
    timer: Any,
    compiled: UnitForwards,
) -> tuple[torch.Tensor, torch.Tensor | None, Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward and backward of every micro-batch; gradients reduced in backward land in
    tensors shaped like ``anchors`` (the master weights, or their device stand-ins).

    Returns ``(loss sum, token count or None, aux, summed grads, buffers)``.
    """
    buffers = state.buffers
    acc: dict[str, torch.Tensor] | None = None
    loss_sum = torch.zeros((), dtype=torch.float32, device=state.step.device)
    count: torch.Tensor | None = None
    aux = None
    for i, micro in enumerate(split_micro_batches(batch, grad_accum)):
        fb = forward_backward(
            plan, loss_fn, state.params, anchors, buffers, micro, multiplier,
            single_micro_batch=grad_accum == 1, order=order, timer=timer, compiled=compiled,
        )  # fmt: skip
        aux, grads, buffers = fb.aux, fb.grads, fb.buffers
        loss_sum = loss_sum + fb.loss.float()
        if (fb.count is None) != (count is None) and i > 0:
            raise TypeError(
                f"loss_fn returned a TokenLoss for some micro-batches and a plain loss for others "
                f"(micro-batch {i}); return the same kind for every micro-batch"
            )
        if fb.count is not None:
            count = fb.count if count is None else count + fb.count
        if acc is None:
            acc = _pop_as_fp32(grads) if own_accumulator else grads
        else:
            torch._foreach_add_(list(acc.values()), [grads[n] for n in acc])
    assert acc is not None
    return loss_sum, count, aux, acc, buffers


_CAST_CHUNK_NUMEL = 1 << 26  # 256 MB of fp32 in flight beyond the gradients themselves


def _pop_as_fp32(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 copies of ``grads``, emptying ``grads`` as it goes.

    One foreach copy per chunk of about 64M elements: the multi-tensor kernel casts at memory
    speed (a per-tensor ``.float()`` took 2.4x as long on an H200), and dropping each chunk's
    compute-dtype originals as it goes keeps the bf16 and fp32 copies of all gradients from
    coexisting (2 bytes per parameter less at the step's peak).
    """
    out: dict[str, torch.Tensor] = {}
    names = list(grads)
    while names:
        chunk, numel = [], 0
        while names and (not chunk or numel + grads[names[0]].numel() <= _CAST_CHUNK_NUMEL):
            numel += grads[names[0]].numel()
            chunk.append(names.pop(0))
        src = [grads.pop(n) for n in chunk]
        dst = [torch.empty_like(g, dtype=torch.float32) for g in src]
        torch._foreach_copy_(dst, src)
        out.update(zip(chunk, dst))
    return out


def _norm_and_loss(
    plan: ZeroPlan,
    glist: list[torch.Tensor],
    loss_sum: torch.Tensor,
    count: torch.Tensor | None,
    scale: torch.Tensor,
    grad_accum: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(found_inf, grad_norm, mean_loss, grad_scale)`` over all ranks, from one all-reduce of
    ``[sum of squares, loss (, token count)]``.

    ``grad_scale`` is the factor the reduced gradients carry over the true gradient: the loss
    scale for mean losses; for token sums, also ``global tokens / (ranks * micro-batches)``,
    which the reductions' averages and the micro-batch multiplier leave in.
    """
    device = loss_sum.device
    sq = (
        torch.stack(torch._foreach_norm(glist)).float().pow(2).sum()
        if glist
        else torch.zeros((), device=device)
    )
    # Replicated gradients (stage 0; hybrid sharding's replicas) are held by several ranks:
    # count each element once in the sum over all ranks.
    sq = sq / plan.grad_copies
    world = plan.data_parallel_size
    if count is None:
        totals = torch.stack([sq, loss_sum / grad_accum])
    else:
        totals = torch.stack([sq, loss_sum, count.to(device)])
    if world > 1:
        all_reduce_labelled(
            totals, "all-reduce of the step's gradient norm and loss",
            group=plan.data_parallel_group, op=torch.distributed.ReduceOp.SUM,
        )  # fmt: skip
    if count is None:
        grad_scale, mean_loss = scale, totals[1] / world
    else:
        grad_scale = scale * totals[2] / (world * grad_accum)
        mean_loss = totals[1] / totals[2]
    found_inf = ~torch.isfinite(totals[0])
    if count is not None:
        found_inf = found_inf | (totals[2] <= 0)  # no token in the global batch: nothing to learn
    return found_inf, totals[0].sqrt() / grad_scale, mean_loss, grad_scale


class _Update:
    """The optimizer update of a step: in place into donated tensors, or pure."""

    def __init__(self, optimizer: Any, plan: ZeroPlan, in_place: bool) -> None:
        self.optimizer = optimizer
        self.plan = plan
        self.in_place = in_place
        self.lr_of = getattr(optimizer, "learning_rate", None)

    def __call__(
        self, state: TrainState, grads: dict[str, torch.Tensor], found_inf: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
        """``(lr, params, master, opt_state)`` after the update; nothing changes if ``found_inf``
        (None: the step is known to be finite)."""
        opt, plan = self.optimizer, self.plan
        master, params = state.master, state.params
        lr = self.lr_of(state.opt_state) if self.lr_of is not None else None
        if not isinstance(lr, torch.Tensor):
            device = found_inf.device if found_inf is not None else state.step.device
            lr = torch.as_tensor(0.0 if lr is None else lr, dtype=torch.float32, device=device)
        train_master = {n: master[n] for n in plan.trainable}
        if self.in_place:
            opt_state = opt.update_(
                grads, state.opt_state, train_master,
                found_inf=None if found_inf is None else found_inf.float(), reduce_fn=plan.reduce_fn,
            )  # fmt: skip
            return lr, params, dict(master), opt_state
        updates, opt_state = opt.update(grads, state.opt_state, train_master, reduce_fn=plan.reduce_fn)
        stepped = {n: (train_master[n] + updates[n].to(train_master[n].dtype)) for n in plan.trainable}
        if found_inf is not None:
            stepped = _where_tree(found_inf, train_master, stepped)
            opt_state = _where_tree(found_inf, state.opt_state, opt_state)
        new_master = {**master, **stepped}
        # keep the params/master aliasing of init_state (stage 0 fp32)
        params = {n: new_master[n] if p is master.get(n) else p for n, p in params.items()}
        return lr, params, new_master, opt_state

    def anchors(self, state: TrainState, device: torch.device) -> dict[str, torch.Tensor]:
        """What the unit boundaries reduce gradients into: the master weights themselves."""
        del device
        if state.layout.offload != "none":
            raise ValueError(
                f"the state keeps its optimizer on the host (offload={state.layout.offload!r}) "
                "but make_train_step was built without offload=; pass the same "
                "OptimizerOffload to make_train_step as to init_state"
            )
        return state.master

    def rebuild_params(
        self, params: dict[str, torch.Tensor], master: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The compute parameters from the updated master weights (the stage's ``rebuild_params``)."""
        return self.plan.policy.rebuild_params(self.plan, params, master, in_place=self.in_place)


def _make_update(optimizer: Any, plan: ZeroPlan, *, donate: bool) -> _Update:
    reason = in_place_unsupported_reason(optimizer)
    if donate and reason is not None:
        warnings.warn(
            f"make_train_step: the optimizer cannot update in place ({reason}); every step takes "
            "the pure path, which allocates new master weights and optimizer state (3-4x slower "
            "for AdamW, docs/optimizers.md)",
            stacklevel=3,
        )
    return _Update(optimizer, plan, in_place=donate and reason is None)
