"""ZeRO-Offload: fp32 master weights and optimizer state on the host, the update on the CPU.

With an :class:`OptimizerOffload`, :func:`funczero.init_state` puts ``master`` and every
``opt_state`` leaf on the host (CPU) and keeps only the compute-dtype ``params`` on the device
(at stage 3 a compute-dtype shard of its own, since it can no longer be the master shard). That
takes the 12 bytes per parameter of AdamW's fp32 master, ``mu`` and ``nu`` (divided by the
ranks at stages 1-3) off the device. :func:`funczero.make_train_step` then runs each step as:

1. forward and backward on the device, gradients reduced into fp32 shards as without offload;
2. the global norm, the inf/nan flag, the unscale and the clip on the device, as without offload;
3. the inf/nan flag, then the gradient shards in chunks of about 64M elements, copied into
   pinned host buffers (``non_blocking``, a CUDA event after each chunk); waiting for the flag
   is the step's one device synchronisation (a skipped step, not finite, then runs nothing on
   the host);
4. the optimizer's in-place update on the host tensors, chunk by chunk as each chunk's event
   completes, so the host computes while later chunks are still copied: torch's fused CPU
   AdamW (``torch._fused_adamw_``, vectorised, multi-threaded over torch's intra-op threads) or
   the alias's foreach step. Updates that are not elementwise per parameter (a ``chain`` with a
   global-norm clip) run in one call once every chunk has arrived;
5. the updated master weights cast to the compute dtype on the host, copied to the device
   (``non_blocking`` from pinned buffers: the host goes on to the next step while they
   travel), and the stage's ``rebuild_params`` (all-gather at stages 1-2, keep the shards at 3).

The trajectory is the one without offload, bit for bit for optimizers with a fused CPU kernel
(Adam/AdamW/SGD/Adagrad): the same kernel runs on the same values, and a cast to the compute
dtype rounds the same on either device.

Stage 0 keeps full replicated master weights on every rank: as DeepSpeed, funczero refuses
offload there (use stage 1 or 2, which offload the same tensors, sharded).

Example:
    >>> import torch, funczero
    >>> from funczero.parallel.plan import build_plan
    >>> plan = build_plan(torch.nn.Linear(3, 1), stage=2)
    >>> offload = OptimizerOffload()
    >>> params, buffers = funczero.module.extract_tensors(torch.nn.Linear(3, 1), plan.spec)
    >>> opt = funczero.optim.adamw(0.1)
    >>> state = funczero.init_state(plan, opt, params, buffers, offload=offload)
    >>> state.layout.offload, state.params["weight"] is state.master["weight"]
    ('cpu', False)
    >>> step = funczero.make_train_step(lambda m, b: m(b).pow(2).mean(), opt, plan, offload=offload)
    >>> state, metrics = step(state, torch.ones(2, 3))
    >>> int(state.step)
    1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from funczero.parallel.plan import ZeroPlan

__all__ = ["OffloadedUpdate", "OptimizerOffload", "check_offload_stage"]

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class OptimizerOffload:
    """Where a ZeRO-Offload run keeps its optimizer (DeepSpeed's ``offload_optimizer`` block).

    Attributes:
        device: the host device type; ``"cpu"`` (NVMe is not implemented).
        pin_memory: stage the gradients and updated parameters that cross between host and a
            CUDA device in page-locked memory, so the copies run asynchronously at full PCIe
            speed. Ignored when the device is not CUDA.
    """

    device: str = "cpu"
    pin_memory: bool = True

    def __post_init__(self) -> None:
        if self.device != "cpu":
            raise ValueError(
                f"OptimizerOffload(device={self.device!r}): only 'cpu' is implemented (NVMe "
                "offload is not); use device='cpu'"
            )

    @property
    def host(self) -> torch.device:
        """Where the master weights and optimizer state live."""
        return torch.device(self.device)

    def pins(self, device: torch.device) -> bool:
        """Whether buffers exchanged with ``device`` are pinned (CUDA with ``pin_memory``)."""
        return self.pin_memory and device.type == "cuda"


def check_offload_stage(stage: int) -> None:
    """Refuse offload at stage 0 (as DeepSpeed does), where nothing is sharded.

    Example:
        >>> check_offload_stage(0)
        Traceback (most recent call last):
        ...
        ValueError: optimizer offload needs ZeRO stage 1, 2 or 3 (got stage 0, ...
    """
    if stage == 0:
        raise ValueError(
            "optimizer offload needs ZeRO stage 1, 2 or 3 (got stage 0, which keeps full "
            "master weights on every rank; DeepSpeed refuses offload there too); set "
            "zero_optimization.stage to 1 or 2 (the same tensors are offloaded, sharded) or "
            "remove offload_optimizer"
        )


class OffloadedUpdate:
    """The optimizer update of a step whose master weights and optimizer state are on the host.

    Owns the host staging buffers (pinned on CUDA), allocated on the first step and reused:
    fp32 gradients (device to host) and compute-dtype parameters (host to device), one of each
    per trainable parameter, shaped like its master weights.

    Args:
        update: the step's update on same-device tensors (``_Update`` of
            :mod:`funczero.train.step`): called with host gradients and a host ``found_inf``.
        plan: the ZeRO plan.
        offload: the offload settings.
    """

    def __init__(self, update: Any, plan: ZeroPlan, offload: OptimizerOffload) -> None:
        check_offload_stage(plan.stage)
        self.inner = update
        self.plan = plan
        self.offload = offload
        self.in_place = update.in_place
        self._grads: Tensors = {}
        self._compute: Tensors = {}
        self._anchors: Tensors = {}

    def anchors(self, state: Any, device: torch.device) -> Tensors:
        """Device stand-ins for the host master weights as autograd's differentiated inputs.

        The unit boundaries reduce gradients into tensors of the master weights' shape on the
        device, and only read the inputs' shapes: zero-stride views of one scalar cost nothing.
        """
        master = state.master
        stale = any(a.shape != master[n].shape or a.device != device for n, a in self._anchors.items())
        if stale or len(self._anchors) != len(self.plan.trainable):
            zero = torch.zeros((), dtype=torch.float32, device=device)
            self._anchors = {n: zero.expand(master[n].shape) for n in self.plan.trainable}
        return self._anchors

    def _buffers(self, master: Mapping[str, torch.Tensor], device: torch.device) -> None:
        if self._grads and all(self._grads[n].shape == master[n].shape for n in self.plan.trainable):
            return
        pin = self.offload.pins(device)
        compute = self.plan.precision.compute_dtype
        host = self.offload.host
        self._grads = {
            n: torch.empty(master[n].shape, dtype=torch.float32, device=host, pin_memory=pin)
            for n in self.plan.trainable
        }
        self._compute = {
            n: torch.empty(master[n].shape, dtype=compute, device=host, pin_memory=pin)
            for n in self.plan.trainable
        }

    def __call__(
        self, state: Any, grads: dict[str, torch.Tensor], found_inf: torch.Tensor
    ) -> tuple[torch.Tensor, Tensors, Tensors, Any]:
        """``(lr, params, master, opt_state)`` after the host update; nothing changes if ``found_inf``.

        The gradients travel in chunks, each with a CUDA event: the host updates chunk ``k``
        while chunk ``k + 1`` is still being copied.
        """
        if state.layout.offload == "none":
            raise ValueError(
                "make_train_step was built with offload= but the state keeps its optimizer on "
                "the device; build the state with init_state(..., offload=) (or initialize()) "
                "with the same offload settings"
            )
        device = found_inf.device
        self._buffers(state.master, device)
        cuda = device.type == "cuda"
        non_blocking = self.offload.pins(device)
        # The flag first: waiting for it waits for backward and the norm, not for the copies.
        flag = found_inf.to(self.offload.host, non_blocking=non_blocking)
        flag_ready = _record_event() if cuda else None
        chunks = self._chunks(state)
        arrived = []
        for names in chunks:
            for n in names:
                self._grads[n].copy_(grads[n], non_blocking=non_blocking)
            arrived.append(_record_event() if cuda else None)
        if flag_ready is not None:
            flag_ready.synchronize()  # the step's one wait for the device
        lr_of = self.inner.lr_of
        lr = torch.as_tensor(lr_of(state.opt_state) if lr_of is not None else 0.0, dtype=torch.float32)
        if bool(flag):  # counts advance by 0 and nothing is written: the same as a skipping kernel
            return lr.to(device), dict(state.params), dict(state.master), state.opt_state
        if len(chunks) == 1:
            if arrived[0] is not None:
                arrived[0].synchronize()
            host_grads = {n: self._grads[n] for n in chunks[0]}
            _, params, master, opt_state = self.inner(state, host_grads, None)
            return lr.to(device), params, master, opt_state
        opt_state = state.opt_state
        every = frozenset(self.plan.trainable)
        for names, event in zip(chunks, arrived):
            if event is not None:
                event.synchronize()
            part = self.inner.optimizer.update_(
                {n: self._grads[n] for n in names}, _restrict(state.opt_state, every, names),
                {n: state.master[n] for n in names}, found_inf=None, reduce_fn=self.plan.reduce_fn,
            )  # fmt: skip
            # Moments were updated in place; counts and schedules advanced alike in every chunk.
            opt_state = _merge(state.opt_state, part, every)
        return lr.to(device), dict(state.params), dict(state.master), opt_state

    def _chunks(self, state: Any) -> list[list[str]]:
        """Trainable parameters in runs of about :attr:`CHUNK_NUMEL` elements, or all in one
        when the update is not elementwise per parameter (a chain with a global-norm clip) or not
        in place."""
        trainable = list(self.plan.trainable)
        if not (self.in_place and _elementwise(self.inner.optimizer)) or not trainable:
            return [trainable]
        chunks: list[list[str]] = [[]]
        size = 0
        for n in trainable:
            if chunks[-1] and size >= self.CHUNK_NUMEL:
                chunks.append([])
                size = 0
            chunks[-1].append(n)
            size += state.master[n].numel()
        return chunks

    CHUNK_NUMEL = 1 << 26
    """Elements per gradient chunk (256 MiB of fp32): large enough that a CPU update call is
    long against its overhead, small enough that the first one starts early."""

    def rebuild_params(self, params: Tensors, master: Tensors) -> Tensors:
        """Compute-dtype device parameters from the host master weights, then the stage's
        ``rebuild_params`` on the device copies."""
        plan = self.plan
        device = next((params[n].device for n in params), self.offload.host)
        non_blocking = self.offload.pins(device)
        compute = plan.precision.compute_dtype
        shards: Tensors = {}
        for n in plan.trainable:
            staged = self._compute[n]
            staged.copy_(master[n])  # the cast, on the host's threads
            in_params = plan.is_sharded(n) and self.in_place and params[n].dtype == compute
            out = params[n] if in_params else torch.empty(staged.shape, dtype=compute, device=device)
            out.copy_(staged, non_blocking=non_blocking)
            shards[n] = out
        return plan.policy.rebuild_params(plan, params, shards, in_place=self.in_place)


# The aliases whose in-place update treats each parameter on its own (per-parameter moments, a
# per-parameter trust ratio): updating some parameters at a time is the same update.
_ELEMENTWISE = frozenset({"adam", "adamw", "sgd", "adagrad", "lion", "lamb"})


def _elementwise(optimizer: Any) -> bool:
    update_ = getattr(optimizer, "update_", None)
    return update_ is not None and getattr(update_, "__qualname__", "").split(".")[0] in _ELEMENTWISE


def _record_event() -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record()
    return event


def _restrict(tree: Any, every: frozenset[str], names: list[str]) -> Any:
    """``tree`` with each per-parameter dict (keyed by every trainable parameter) cut to ``names``."""
    if isinstance(tree, dict) and tree.keys() == every:
        return {n: tree[n] for n in names}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_restrict(x, every, names) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_restrict(x, every, names) for x in tree)
    return tree


def _merge(full: Any, part: Any, every: frozenset[str]) -> Any:
    """``part``'s values (counts) with ``full``'s per-parameter dicts (updated in place)."""
    if isinstance(full, dict) and full.keys() == every:
        return full
    if isinstance(full, tuple) and hasattr(full, "_fields"):
        return type(full)(*(_merge(f, p, every) for f, p in zip(full, part)))
    if isinstance(full, (tuple, list)):
        return type(full)(_merge(f, p, every) for f, p in zip(full, part))
    return part
