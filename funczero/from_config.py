"""Runtime objects from a resolved :class:`~funczero.config.Config`.

``Config`` is plain data and imports nothing of the runtime; these functions turn it into the
objects a training run needs: the optimizer (driven by the configured schedule), the schedule
alone (for a client optimizer), the precision policy, the loss-scaler settings and the optimizer
offload.
:func:`funczero.initialize` calls them; call them yourself when you assemble a run by hand.

Example:
    >>> from funczero.config import Config
    >>> cfg = Config.load({"train_batch_size": 8, "fp16": {"enabled": True},
    ...                    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, world_size=1)
    >>> opt = optimizer_from_config(cfg)
    >>> precision_from_config(cfg).compute_dtype, loss_scale_from_config(cfg).init_scale
    (torch.float16, 65536.0)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from funczero import optim
from funczero.config import Config, ConfigError, OptimizerConfig
from funczero.config.errors import warn
from funczero.config.keys import KEY_HOMES, OFFLOAD_OPTIMIZER
from funczero.config.schema import parse_block
from funczero.optim import Optimizer, Schedule
from funczero.optim.schedules import from_deepspeed
from funczero.parallel.precision import Precision
from funczero.train.loss_scale import LossScaleConfig
from funczero.train.offload import OptimizerOffload

__all__ = [
    "loss_scale_from_config",
    "offload_from_config",
    "optimizer_from_config",
    "precision_from_config",
    "schedule_from_config",
    "shard_group_size_from_config",
]


def precision_from_config(cfg: Config) -> Precision:
    """The precision policy: ``cfg.precision`` and ``communication_data_type``.

    Example:
        >>> cfg = Config.load({"train_batch_size": 8, "bf16": {"enabled": True}}, world_size=1)
        >>> precision_from_config(cfg).compute_dtype
        torch.bfloat16
    """
    return Precision.from_name(cfg.precision, reduce_dtype=cfg.communication_data_type)


def loss_scale_from_config(cfg: Config) -> LossScaleConfig:
    """The loss-scaler settings: the ``fp16`` block's, or a constant scale of 1 for bf16/fp32.

    Example:
        >>> loss_scale_from_config(Config.load({"train_batch_size": 8}, world_size=1)).dynamic
        False
    """
    if not cfg.fp16.enabled:
        return LossScaleConfig.disabled()
    return LossScaleConfig.from_fp16(
        cfg.fp16, raise_at_min_scale=cfg.funczero.raise_at_min_loss_scale
    )


def offload_from_config(cfg: Config) -> OptimizerOffload | None:
    """The optimizer offload of ``zero_optimization.offload_optimizer``, or None (device "none").

    Raises:
        ConfigError: offload at ZeRO stage 0 (DeepSpeed refuses it too).

    Example:
        >>> cfg = Config.load({"train_batch_size": 8, "zero_optimization": {"stage": 2,
        ...     "offload_optimizer": {"device": "cpu", "pin_memory": True}}}, world_size=1)
        >>> offload_from_config(cfg)
        OptimizerOffload(device='cpu', pin_memory=True)
    """
    zero = cfg.raw.get("zero_optimization")
    block = zero.get("offload_optimizer") if isinstance(zero, Mapping) else None
    if block is None:
        return None
    errors: list[str] = []
    with warnings.catch_warnings():  # Config.load already warned about these values
        warnings.simplefilter("ignore")
        values = parse_block(block, "zero_optimization.offload_optimizer", OFFLOAD_OPTIMIZER, errors, KEY_HOMES)
    if errors:  # pragma: no cover - Config.load applied the same table
        raise ConfigError("; ".join(errors))
    if values["device"] == "none":
        return None
    if cfg.zero.stage == 0:
        raise ConfigError(
            f'zero_optimization.offload_optimizer.device="{values["device"]}" needs ZeRO stage 1, '
            "2 or 3 (stage 0 keeps full master weights on every rank; DeepSpeed refuses offload "
            "there too); set zero_optimization.stage to 1 or 2, or remove offload_optimizer"
        )
    return OptimizerOffload(device=values["device"], pin_memory=values["pin_memory"])


def shard_group_size_from_config(cfg: Config) -> int | None:
    """``zero_optimization.mics_shard_size`` as :func:`~funczero.parallel.plan.build_plan`'s
    ``shard_group_size`` (hybrid sharding), or None for flat ZeRO (-1, or the whole world).

    Raises:
        ConfigError: a size at stage 0, or one that does not divide the world size.

    Example:
        >>> cfg = Config.load({"train_batch_size": 16, "zero_optimization": {"stage": 3,
        ...     "mics_shard_size": 8}}, world_size=16)
        >>> shard_group_size_from_config(cfg)
        8
    """
    from funczero.parallel.hybrid import check_shard_size

    size = cfg.zero.mics_shard_size
    if size == -1:
        return None
    if cfg.zero.stage == 0:
        raise ConfigError(
            f"zero_optimization.mics_shard_size={size} asks for hybrid sharding, which needs "
            "ZeRO stage 1, 2 or 3 (stage 0 shards nothing); set the stage or remove the key"
        )
    try:
        size = check_shard_size(size, world_size=cfg.world_size)
    except ValueError as e:
        raise ConfigError(f"zero_optimization.mics_shard_size={size}: {e}") from None
    if size == 1 and cfg.world_size > 1:
        raise ConfigError(
            "zero_optimization.mics_shard_size=1 shards nothing (every rank a full replica: "
            "plain data parallelism, stage 0); use a shard group of 2 or more ranks, e.g. the "
            "GPUs per node"
        )
    return None if size == cfg.world_size else size


def schedule_from_config(
    cfg: Config, base_lr: float | None = None
) -> tuple[Schedule | float, Schedule | None]:
    """Return ``(learning rate or its schedule, momentum schedule or None)``.

    Args:
        cfg: the config.
        base_lr: the base learning rate; defaults to ``optimizer.params.lr``. Needed when the
            config has a scheduler but no optimizer block (a client optimizer).

    Raises:
        ConfigError: there is neither ``base_lr`` nor an optimizer block.

    Example:
        >>> import torch
        >>> cfg = Config.load({"train_batch_size": 8, "scheduler": {"type": "WarmupLR",
        ...     "params": {"warmup_num_steps": 2, "warmup_type": "linear"}}}, world_size=1)
        >>> lr, momentum = schedule_from_config(cfg, base_lr=0.5)
        >>> [float(lr(torch.tensor(c))) for c in range(4)], momentum
        ([0.0, 0.0, 0.25, 0.5], None)
    """
    if base_lr is None:
        if cfg.optimizer is None:
            raise ConfigError(
                "schedule_from_config: the config has no optimizer block, so pass base_lr= "
                "(the learning rate of the optimizer the schedule drives)"
            )
        base_lr = cfg.optimizer.lr
    if cfg.scheduler is None:
        return base_lr, None
    try:
        return from_deepspeed(cfg.scheduler.type, dict(cfg.scheduler.params), base_lr=base_lr)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"scheduler.params ({cfg.scheduler.type}): {e}") from e


def optimizer_from_config(
    cfg: Config, shapes: Mapping[str, Sequence[int]] | None = None
) -> Optimizer:
    """Build the configured optimizer, driven by the configured schedule if any.

    Missing parameters take DeepSpeed's defaults (the config filled them in). OneCycle's momentum
    schedule drives ``b1``; optimizers without betas (SGD, Adagrad) ignore it with a
    :class:`~funczero.config.ConfigWarning`, as DeepSpeed does. With
    ``funczero.no_decay_for_norms_and_biases: true`` the optimizer's weight decay skips
    parameters of fewer than two dimensions (``mask=optim.no_decay_for_norms_and_biases``),
    decided on ``shapes``.

    Args:
        cfg: the config.
        shapes: every parameter's global (unsharded) shape by canonical name,
            ``plan.spec.shapes``; read only when ``funczero.no_decay_for_norms_and_biases`` is
            true, and then needed, because under ZeRO the optimizer holds 1-D shards.

    Raises:
        ConfigError: there is no ``"optimizer"`` block.
        ValueError: ``funczero.no_decay_for_norms_and_biases`` is true and ``shapes`` is not
            given.

    Example:
        >>> import torch
        >>> cfg = Config.load({"train_batch_size": 8, "funczero": {
        ...     "no_decay_for_norms_and_biases": True}, "optimizer": {
        ...     "type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.5}}}, world_size=1)
        >>> shapes = {"fc.weight": (1, 1), "fc.bias": (1,)}
        >>> opt = optimizer_from_config(cfg, shapes=shapes)
        >>> params = {name: torch.ones(shape) for name, shape in shapes.items()}
        >>> _ = opt.update_({n: torch.zeros_like(p) for n, p in params.items()},
        ...                 opt.init(params), params)
        >>> params["fc.weight"], params["fc.bias"]   # 1 * (1 - 0.1 * 0.5); the bias is not decayed
        (tensor([[0.9500]]), tensor([1.]))
    """
    if cfg.optimizer is None:
        raise ConfigError(
            'optimizer_from_config: the config has no "optimizer" block. Add one, e.g. '
            '"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}, '
            "or pass an optimizer to funczero.initialize(optimizer=...)"
        )
    mask = None
    if cfg.funczero.no_decay_for_norms_and_biases:
        if shapes is None:
            raise ValueError(
                "optimizer_from_config: funczero.no_decay_for_norms_and_biases is true, which "
                "decides by each parameter's global shape, but no shapes were given; pass "
                "shapes=plan.spec.shapes (or {name: p.shape for name, p in "
                "model.named_parameters()}): under ZeRO the optimizer sees 1-D shards"
            )
        mask = optim.no_decay_for_norms_and_biases
    else:
        shapes = None  # nothing reads them
    lr, momentum = schedule_from_config(cfg)
    return _build(cfg.optimizer, lr, momentum, mask, shapes)


def _build(
    block: OptimizerConfig,
    lr: float | Schedule,
    momentum: Schedule | None,
    mask: optim.WeightDecayMask | None,
    shapes: Mapping[str, Sequence[int]] | None,
) -> Optimizer:
    p = block.params
    if momentum is not None and "betas" not in p:
        warn(
            f"{block.type} has no betas, so the scheduler's momentum cycling is ignored "
            "(DeepSpeed disables it the same way); set cycle_momentum: false to silence this"
        )
    b1, b2 = p.get("betas", (0.0, 0.0))
    b1 = b1 if momentum is None else momentum
    algorithm = block.algorithm
    if algorithm in ("adam", "adamw"):
        factory = optim.adamw if algorithm == "adamw" else optim.adam
        return factory(
            lr, b1, b2, p["eps"], weight_decay=p["weight_decay"], mask=mask, shapes=shapes
        )
    if algorithm == "lamb":
        return optim.lamb(
            lr, b1, b2, p["eps"], weight_decay=p["weight_decay"],
            bias_correction=p["bias_correction"], max_coeff=p["max_coeff"],
            min_coeff=p["min_coeff"], mask=mask, shapes=shapes,
        )
    if algorithm == "lion":
        return optim.lion(lr, b1, b2, weight_decay=p["weight_decay"], mask=mask, shapes=shapes)
    if algorithm == "sgd":
        return optim.sgd(
            lr, p["momentum"], dampening=p["dampening"], nesterov=p["nesterov"],
            weight_decay=p["weight_decay"], mask=mask, shapes=shapes,
        )
    return optim.adagrad(
        lr, lr_decay=p["lr_decay"], initial_accumulator_value=p["initial_accumulator_value"],
        eps=p["eps"], weight_decay=p["weight_decay"], mask=mask, shapes=shapes,
    )
