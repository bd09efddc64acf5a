"""The training state: one immutable pytree of tensors.

``TrainState`` holds data only; the model, optimizer and ZeRO plan live in the closures that
:func:`funczero.make_train_step` returns. Leaf names are paths
(``params/blocks.0.attn.qkv.weight``, ``opt_state/0/mu/blocks.0.attn.qkv.weight``), the same in
checkpoints, metrics and error messages.

Layout by ZeRO stage (``W`` ranks; "shard" = this rank's flat, zero-padded 1/W of a parameter):

=========  ===========================  ==============================  ====================
stage      ``params``                   ``master`` (fp32, trainable)    ``opt_state`` leaves
=========  ===========================  ==============================  ====================
0          full, compute dtype          full (same tensor as params     full
                                        in fp32)
1, 2       full, compute dtype          shard                           shard
3          shard (= master)             shard                           shard
=========  ===========================  ==============================  ====================

At stage 3, parameters below ``stage3_param_persistence_threshold`` stay full like stage 2.

With optimizer offload (:mod:`funczero.train.offload`), ``master`` and ``opt_state`` leaves live
on the host with the same placement, and stage 3's sharded ``params`` are compute-dtype shards
of their own on the device (no longer the master shards).

Donation: with ``donate=True`` (the default of :func:`funczero.make_train_step`) a step reuses
the old state's buffers in place, as JAX's ``donate_argnums``. The old state is then marked
donated and any use of it raises :class:`DonatedStateError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch

from funczero import struct, tree
from funczero.module import InitFn, materialize
from funczero.parallel.sharding import ShardSpec
from funczero.parallel.stages import STAGES
from funczero.train.loss_scale import LossScaleConfig, init_loss_scale
from funczero.train.offload import OptimizerOffload, check_offload_stage
from funczero.train.rng import init_rng

if TYPE_CHECKING:
    from funczero.parallel.plan import ZeroPlan

__all__ = [
    "DonatedStateError",
    "LeafKind",
    "LeafLayout",
    "Placement",
    "StateLayout",
    "TrainState",
    "describe_leaves",
    "init_state",
]

_FIELDS = frozenset(
    {"step", "params", "master", "opt_state", "loss_scale", "buffers", "rng", "skipped", "layout"}
)


Placement = Literal["shard", "replicated", "per_rank"]
"""Where a leaf's values live: ``shard`` (rank ``r`` holds the flat zero-padded chunk
``ShardSpec(param, shape, W).bounds(r)``), ``replicated`` (every rank holds the whole, identical
tensor) or ``per_rank`` (every rank holds its own, different tensor: the RNG state)."""

LeafKind = Literal["param", "master", "moment", "optim", "buffer", "scalar", "rng"]


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """How one leaf of a :class:`TrainState` is laid out across ranks.

    Recorded once, when the state is built (:func:`describe_leaves`), and read by checkpoints,
    resharding and memory accounting instead of being guessed from paths and shapes again.

    Attributes:
        kind: what the leaf is (``param``, ``master``, ``moment``, ``optim``, ``buffer``,
            ``scalar`` or ``rng``).
        placement: ``shard``, ``replicated`` or ``per_rank`` (see :data:`Placement`).
        param: the parameter whose :class:`~funczero.parallel.sharding.ShardSpec` a ``shard``
            leaf follows, else None.
        shape: global shape (``per_rank``: this rank's shape).
    """

    kind: LeafKind
    placement: Placement
    param: str | None
    shape: tuple[int, ...]

    @property
    def group(self) -> str:
        """Checkpoint file group: ``model`` (params, master, buffers) or ``optim`` (the rest)."""
        return "model" if self.kind in ("param", "master", "buffer") else "optim"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Static description of how a state's tensors are laid out on this rank.

    Attributes:
        stage: ZeRO stage 0-3.
        world_size: number of data-parallel ranks.
        rank: this rank.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        shapes: ``(name, global shape)`` of every parameter (canonical FQNs, module order).
        trainable: parameters that have master weights and optimizer state.
        aliases: ``(alias FQN, canonical FQN)`` for tied weights (the canonical name is the key
            in ``params``; consolidated checkpoints write every alias).
        leaves: ``(path, LeafLayout)`` of every tensor leaf, fields in name order (look leaves
            up by path: :meth:`leaf`, :meth:`leaf_map`).
        offload: where master weights and optimizer state live: ``"none"`` (with the
            parameters) or ``"cpu"`` (ZeRO-Offload, :mod:`funczero.train.offload`).
    """

    stage: int
    world_size: int
    rank: int
    precision: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    trainable: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()
    leaves: tuple[tuple[str, LeafLayout], ...] = ()
    offload: str = "none"

    def leaf(self, path: str) -> LeafLayout:
        """The recorded layout of leaf ``path`` (e.g. ``opt_state/0/mu/w``).

        Raises:
            KeyError: the state was not built with such a leaf (its structure changed after
                :func:`funczero.init_state`).
        """
        for p, layout in self.leaves:
            if p == path:
                return layout
        raise KeyError(
            f"state leaf {path!r} has no recorded layout: the state's structure differs from "
            "the one init_state built (build states with init_state, or describe_leaves)"
        )

    def leaf_map(self) -> dict[str, LeafLayout]:
        """``{path: LeafLayout}`` of every leaf (a new dict; build it once per operation)."""
        return dict(self.leaves)

    @property
    def sharded_params(self) -> frozenset[str]:
        """Parameters whose ``state.params`` entry is a shard (stage 3, not persistent)."""
        return frozenset(
            lay.param for p, lay in self.leaves
            if lay.kind == "param" and lay.placement == "shard" and lay.param is not None
        )  # fmt: skip


def describe_leaves(
    tensors: Mapping[str, Any],
    *,
    shapes: Mapping[str, tuple[int, ...]],
    trainable: Iterable[str],
    sharded_params: Iterable[str],
    master_sharded: bool,
    world_size: int,
) -> tuple[tuple[str, LeafLayout], ...]:
    """Record the layout of every leaf of a state's fields.

    Args:
        tensors: the state's fields by name (``params``, ``master``, ``opt_state``, ...); paths
            are the same as the :class:`TrainState`'s (``params/w``, ``opt_state/0/mu/w``).
        shapes: global shape of every parameter.
        trainable: parameters that have master weights and optimizer state.
        sharded_params: parameters whose ``params`` entry is a shard.
        master_sharded: whether master weights and per-parameter optimizer state are shards.
        world_size: ranks the shards are cut for.

    An optimizer leaf follows its parameter's layout when its path ends in a trainable
    parameter's name and it has that parameter's (shard) shape, as every elementwise optimizer
    state does; anything else under ``opt_state`` is replicated, except a per-parameter leaf of
    another shape under ZeRO (a factored moment), which is kept exactly per rank.
    """
    facts = _Facts(shapes, frozenset(trainable), frozenset(sharded_params), master_sharded, world_size)
    out = []
    for path, leaf in tree.leaves_with_path(dict(tensors)):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"state leaf {path!r} is a {type(leaf).__name__}, not a tensor; a TrainState "
                "holds only tensors (numbers that change belong in 0-d tensors)"
            )
        out.append((path, _describe_leaf(path, tuple(leaf.shape), facts)))
    return tuple(out)


class _Facts(NamedTuple):
    shapes: Mapping[str, tuple[int, ...]]
    trainable: frozenset[str]
    sharded: frozenset[str]
    master_sharded: bool
    world_size: int


def _describe_leaf(path: str, shape: tuple[int, ...], facts: _Facts) -> LeafLayout:
    head, _, rest = path.partition("/")
    last = path.rsplit("/", 1)[-1]

    def per_param(name: str, is_shard: bool, kind: LeafKind) -> LeafLayout | None:
        if name not in facts.shapes:
            return None
        full = tuple(facts.shapes[name])
        if is_shard and shape == (ShardSpec(name, torch.Size(full), facts.world_size).shard_numel,):
            return LeafLayout(kind, "shard", name, full)
        if not is_shard and shape == full:
            return LeafLayout(kind, "replicated", None, full)
        return None

    layout: LeafLayout | None = None
    if head == "params" and rest:
        layout = per_param(rest, rest in facts.sharded, "param")
    elif head == "master" and rest:
        layout = per_param(rest, facts.master_sharded, "master")
    elif head == "opt_state":
        if last in facts.trainable:
            layout = per_param(last, facts.master_sharded, "moment")
        if layout is None and (last not in facts.trainable or not facts.master_sharded):
            layout = LeafLayout("optim", "replicated", None, shape)
    elif head == "buffers":
        layout = LeafLayout("buffer", "replicated", None, shape)
    elif head == "rng":
        layout = LeafLayout("rng", "per_rank", None, shape)
    elif head in ("step", "skipped", "loss_scale"):
        layout = LeafLayout("scalar", "replicated", None, shape)
    if layout is None:
        # A per-parameter leaf whose shape is neither the parameter's nor its shard (a factored
        # second moment under ZeRO): kept exactly per rank; it cannot be resharded.
        kinds: dict[str, LeafKind] = {"params": "param", "master": "master", "opt_state": "moment"}
        kind = kinds.get(head, "optim")
        layout = LeafLayout(kind, "per_rank", None, shape)
    return layout


class DonatedStateError(RuntimeError):
    """Raised when a state whose buffers were donated to a step is used again."""


@struct.dataclass
class TrainState:
    """Everything that changes during training, as tensors.

    Attributes:
        step: int64 0-d, optimizer steps attempted (skipped ones included).
        params: compute-dtype parameters keyed by canonical module FQN (full or shard).
        master: fp32 master weights of trainable parameters (full at stage 0, else shards).
        opt_state: the optimizer's state pytree (moments in fp32, laid out like ``master``).
        loss_scale: the dynamic loss scaler's state (constant scale 1 unless fp16).
        buffers: module buffers (BatchNorm statistics...) keyed by FQN, replicated.
        rng: generator state of the compute device (uint8), advanced by each step.
        skipped: int64 0-d, steps skipped because gradients were not finite.
        layout: static (not a leaf): stage, world size, rank and shapes, so checkpoints can be
            written and read into this state without further arguments.
    """

    step: torch.Tensor
    params: dict[str, torch.Tensor]
    master: dict[str, torch.Tensor]
    opt_state: Any
    loss_scale: Any
    buffers: dict[str, torch.Tensor]
    rng: torch.Tensor
    skipped: torch.Tensor
    layout: StateLayout = struct.field(static=True)

    @classmethod
    def create(
        cls,
        *,
        stage: int,
        world_size: int,
        rank: int,
        precision: str,
        shapes: Mapping[str, tuple[int, ...]],
        trainable: tuple[str, ...],
        sharded_params: Iterable[str],
        aliases: tuple[tuple[str, str], ...] = (),
        offload: str = "none",
        **fields: Any,
    ) -> TrainState:
        """Build a state from its tensor fields, recording every leaf's :class:`LeafLayout`.

        ``fields`` are the tensor fields (``step``, ``params``, ``master``, ``opt_state``,
        ``loss_scale``, ``buffers``, ``rng``, ``skipped``); the rest describes the layout.
        Where master weights and optimizer state are shards follows the stage's policy;
        ``offload`` records where they live (:attr:`StateLayout.offload`).
        """
        shapes = {n: tuple(s) for n, s in shapes.items()}
        layout = StateLayout(
            stage=stage,
            world_size=world_size,
            rank=rank,
            precision=precision,
            shapes=tuple(shapes.items()),
            trainable=tuple(trainable),
            aliases=tuple(aliases),
            leaves=describe_leaves(
                fields,
                shapes=shapes,
                trainable=trainable,
                sharded_params=sharded_params,
                master_sharded=STAGES[stage].master_sharded,
                world_size=world_size,
            ),
            offload=offload,
        )
        return cls(**fields, layout=layout)

    def __getattribute__(self, name: str) -> Any:
        if name in _FIELDS and object.__getattribute__(self, "__dict__").get("_donated"):
            raise DonatedStateError(
                f"this TrainState was donated to train_step (its buffers now hold the next "
                f"step's values), so reading state.{name} is an error; use the state that "
                "train_step returned, or build the step with donate=False to keep old states"
            )
        return object.__getattribute__(self, name)

    def mark_donated(self) -> None:
        """Invalidate this state (called by a donating ``train_step``)."""
        object.__setattr__(self, "_donated", True)

    @property
    def donated(self) -> bool:
        """Whether this state was donated to a step."""
        return bool(object.__getattribute__(self, "__dict__").get("_donated"))


def init_state(
    plan: ZeroPlan,
    optimizer: Any,
    full_params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    *,
    init_fn: InitFn | None = None,
    seed: int = 0,
    loss_scale: LossScaleConfig | None = None,
    device: torch.device | str | None = None,
    offload: OptimizerOffload | None = None,
) -> TrainState:
    """Build this rank's initial :class:`TrainState`.

    Args:
        plan: the ZeRO plan (stage, precision, layout).
        optimizer: a :class:`funczero.optim.GradientTransformation`.
        full_params: every canonical parameter at full size (e.g. from the module); identical on
            all ranks (same seed), each rank keeps its part. None: create them from
            ``plan.module`` (built on the meta device) with :func:`funczero.module.materialize`,
            one module at a time, keeping only this rank's part of each: peak memory is this
            rank's state plus one module, and the same global seed gives the same weights at
            any world size and stage.
        buffers: module buffers (with ``full_params``; otherwise created with them).
        init_fn: with ``full_params=None``: initialises one module's own tensors (default: the
            model's ``_init_weights(module)``, else each module's ``reset_parameters()``).
        seed: seed of the state's RNG (rank ``r`` uses ``seed + r``).
        loss_scale: fp16 loss-scaler settings (default: no scaling).
        device: where the state lives (default: the parameters' device; CPU when created).
        offload: keep the master weights and optimizer state on the host (ZeRO-Offload,
            stages 1-3; :mod:`funczero.train.offload`); give the step the same setting.

    Example:
        >>> import torch
        >>> from funczero import optim
        >>> from funczero.parallel.plan import build_plan
        >>> plan = build_plan(torch.nn.Linear(3, 1), stage=3)
        >>> full = {"weight": torch.ones(1, 3), "bias": torch.zeros(1)}
        >>> state = init_state(plan, optim.sgd(0.1), full, {})
        >>> state.layout.leaf("master/weight")
        LeafLayout(kind='master', placement='shard', param='weight', shape=(1, 3))
    """
    if full_params is None:
        if buffers is not None:
            raise ValueError("init_state: pass buffers only with full_params (both, or neither)")
        source: _Source = _Source(materialize(plan.module, plan.spec, init_fn))
    else:
        source = _Source(iter(full_params.items()))
    if device is not None:
        device = torch.device(device)
    else:
        device = next((t.device for t in (full_params or {}).values()), torch.device("cpu"))
    if offload is not None:
        check_offload_stage(plan.stage)
    params, master = _lay_out_params(plan, source, device, offload.host if offload is not None else None)
    if full_params is None:
        buffers = {n: source.take(n) for n in plan.spec.buffers}
    return TrainState.create(
        stage=plan.stage,
        world_size=plan.world_size,
        rank=plan.rank,
        precision=plan.precision.name,
        shapes={n: tuple(plan.spec.shapes[n]) for n in plan.spec.params},
        trainable=plan.trainable,
        sharded_params=[n for n in plan.spec.params if plan.is_sharded(n)],
        aliases=tuple((a, c) for a, c in plan.spec.aliases.items() if a != c),
        offload=offload.device if offload is not None else "none",
        step=torch.zeros((), dtype=torch.int64, device=device),
        params=params,
        master=master,
        opt_state=optimizer.init({n: master[n] for n in plan.trainable}),
        loss_scale=init_loss_scale(loss_scale or LossScaleConfig.disabled(), device=device),
        buffers={n: b.detach().to(device).clone() for n, b in (buffers or {}).items()},
        # Every data-parallel rank draws its own dropout masks (replicas of a hybrid mesh too).
        rng=init_rng(seed, device=device, rank=plan.data_parallel_rank),
        skipped=torch.zeros((), dtype=torch.int64, device=device),
    )


class _Source:
    """Tensors by name from an iterator, taken once each; what arrives early waits in a dict."""

    def __init__(self, items: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._items = items
        self._waiting: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        while name not in self._waiting:
            try:
                key, value = next(self._items)
            except StopIteration:
                raise KeyError(f"init_state: no tensor named {name!r} among the full parameters / buffers") from None
            self._waiting[key] = value
        return self._waiting.pop(name)


def _lay_out_params(
    plan: ZeroPlan, source: _Source, device: torch.device, host: torch.device | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full fp32 parameters as this rank's ``(params, master)`` for the plan's stage.

    ``params`` are what the model runs on (compute dtype; full, or fp32 shards at stage 3);
    ``master`` are the fp32 weights the optimizer updates (trainable only; shards from stage 1).
    Where the two would be equal, they are the same tensor. One full parameter at a time is on
    ``device``. With a ``host`` (offload) master weights live there, always apart from ``params``.
    """
    compute = plan.precision.compute_dtype
    params: dict[str, torch.Tensor] = {}
    master: dict[str, torch.Tensor] = {}
    trainable = set(plan.trainable)
    for n in plan.spec.params:
        x = source.take(n).detach().to(device).to(torch.float32)
        if plan.master_sharded and n in trainable:
            master[n] = plan.shard_specs[n].shard(x, plan.rank)
        elif n in trainable:
            master[n] = x.clone()
        if host is not None and n in master:
            on_device = master[n]
            master[n] = on_device.to(host, copy=True)
            if plan.is_sharded(n):  # a compute-dtype shard of its own, on the device
                params[n] = on_device.to(compute, copy=True)
            del on_device
        if n in params:
            continue
        if plan.is_sharded(n):
            params[n] = master[n] if n in trainable else plan.shard_specs[n].shard(x, plan.rank)
        elif host is None and n in master and master[n].shape == x.shape and compute == torch.float32:
            params[n] = master[n]
        else:
            params[n] = x.to(compute).clone()
        del x
    return params, master
