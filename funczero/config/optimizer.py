"""The ``optimizer`` and ``scheduler`` blocks: parsing, and building funczero.optim objects."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from funczero.config.errors import ConfigError, closest, did_you_mean, show, warn
from funczero.config.keys import (
    OPTIMIZER_BLOCK,
    OPTIMIZER_PARAMS,
    OPTIMIZER_TYPES,
    SCHEDULER_BLOCK,
    UNSUPPORTED_OPTIMIZERS,
)
from funczero.config.schema import parse_block, unknown_key

if TYPE_CHECKING:
    from funczero.optim import Optimizer
    from funczero.optim.schedules import Schedule

__all__ = ["OptimizerConfig", "SchedulerConfig", "parse_optimizer", "parse_scheduler"]

_SUPPORTED = ", ".join(OPTIMIZER_PARAMS)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """A resolved ``"optimizer"`` block.

    Attributes:
        type: canonical DeepSpeed spelling: ``Adam``, ``AdamW``, ``Lamb``, ``Lion``, ``SGD`` or
            ``Adagrad`` (the input is matched case-insensitively).
        params: every parameter of that type under its DeepSpeed/torch name, defaults filled in
            (``betas`` as a tuple). Treat as read-only.

    Example:
        >>> from funczero.config import Config
        >>> cfg = Config.load({"train_batch_size": 8,
        ...                    "optimizer": {"type": "adam", "params": {"lr": 3e-4}}}, world_size=1)
        >>> cfg.optimizer.type, cfg.optimizer.algorithm, cfg.optimizer.params["weight_decay"]
        ('Adam', 'adamw', 0.0)
    """

    type: str
    params: dict[str, Any]

    @property
    def lr(self) -> float:
        """The configured learning rate (the base value when a scheduler is configured)."""
        return float(self.params["lr"])

    @property
    def algorithm(self) -> str:
        """The funczero.optim factory used (``"Adam"`` is AdamW unless adam_w_mode is false)."""
        if self.type in ("Adam", "AdamW"):
            return "adamw" if self.type == "AdamW" or self.params["adam_w_mode"] else "adam"
        return self.type.lower()

    def build(
        self,
        learning_rate: float | Schedule | None = None,
        momentum: Schedule | None = None,
    ) -> Optimizer:
        """Build the funczero optimizer, with DeepSpeed's defaults for missing parameters.

        Args:
            learning_rate: a float or schedule replacing ``params["lr"]`` (see
                :meth:`Config.build_optimizer`, which passes the configured scheduler's).
            momentum: a schedule for ``b1`` (OneCycle's momentum cycling). As in DeepSpeed it is
                ignored, with a warning, by optimizers without betas (SGD, Adagrad).

        Returns:
            The ``funczero.optim`` optimizer.
        """
        from funczero import optim

        p = self.params
        lr = self.lr if learning_rate is None else learning_rate
        if momentum is not None and "betas" not in p:
            warn(
                f"{self.type} has no betas, so the scheduler's momentum cycling is ignored "
                "(DeepSpeed disables it the same way); set cycle_momentum: false to silence this"
            )
        b1, b2 = p.get("betas", (0.0, 0.0))
        b1 = b1 if momentum is None else momentum
        algorithm = self.algorithm
        if algorithm in ("adam", "adamw"):
            factory = optim.adamw if algorithm == "adamw" else optim.adam
            return factory(lr, b1, b2, p["eps"], weight_decay=p["weight_decay"])
        if algorithm == "lamb":
            return optim.lamb(
                lr, b1, b2, p["eps"], weight_decay=p["weight_decay"],
                bias_correction=p["bias_correction"], max_coeff=p["max_coeff"],
                min_coeff=p["min_coeff"],
            )
        if algorithm == "lion":
            return optim.lion(lr, b1, b2, weight_decay=p["weight_decay"])
        if algorithm == "sgd":
            return optim.sgd(
                lr, p["momentum"], dampening=p["dampening"], nesterov=p["nesterov"],
                weight_decay=p["weight_decay"],
            )
        return optim.adagrad(
            lr, lr_decay=p["lr_decay"], initial_accumulator_value=p["initial_accumulator_value"],
            eps=p["eps"], weight_decay=p["weight_decay"],
        )

    def to_dict(self) -> dict[str, Any]:
        """The block in DeepSpeed JSON form (lists instead of tuples)."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return {"type": self.type, "params": params}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A ``"scheduler"`` block, with the ``"auto"`` values that can be computed resolved.

    Its parameters are checked by ``funczero.optim.schedules.from_deepspeed`` (the schedule
    implementation owns its parameter set), once at load time and again in :meth:`build`.

    Attributes:
        type: the DeepSpeed schedule name as given (``WarmupLR``, ``WarmupDecayLR``,
            ``WarmupCosineLR``, ``OneCycle``, ``LRRangeTest``).
        params: its parameters. Treat as read-only.
    """

    type: str
    params: dict[str, Any]

    def build(self, *, base_lr: float) -> tuple[Schedule, Schedule | None]:
        """Return ``(learning-rate schedule, momentum schedule or None)``.

        Args:
            base_lr: the optimizer's learning rate (DeepSpeed schedules read it from the optimizer).

        Raises:
            ConfigError: the schedule rejects its type or parameters.
        """
        from funczero.optim.schedules import from_deepspeed

        try:
            return from_deepspeed(self.type, dict(self.params), base_lr=base_lr)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"scheduler.params ({self.type}): {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """The block in DeepSpeed JSON form."""
        return {"type": self.type, "params": dict(self.params)}


def _unknown_type(name: str) -> str:
    lower = name.lower()
    if lower in UNSUPPORTED_OPTIMIZERS:
        return (
            f"optimizer.type {show(name)}: DeepSpeed's {UNSUPPORTED_OPTIMIZERS[lower]} is not "
            f"supported by funczero; supported types: {_SUPPORTED}"
        )
    import torch.optim

    if isinstance(getattr(torch.optim, name, None), type):
        return (
            f"optimizer.type {show(name)}: DeepSpeed would build torch.optim.{name}; funczero's "
            f"config supports {_SUPPORTED}. For anything else pass a funczero.optim optimizer "
            "to funczero.initialize(optimizer=...) and drop the optimizer block"
        )
    match = closest(lower, list(OPTIMIZER_TYPES))
    hint = f"; did you mean '{OPTIMIZER_TYPES[match]}'?" if match else ""
    return f"optimizer.type {show(name)} is not a known optimizer{hint} (supported: {_SUPPORTED})"


def parse_optimizer(raw: dict[str, Any], errors: list[str]) -> OptimizerConfig | None:
    """Validate an ``"optimizer"`` block; problems go to ``errors`` and ``None`` is returned."""
    block = parse_block(raw, "optimizer", OPTIMIZER_BLOCK, errors)
    name = block["type"]
    if name is None:
        if "type" not in raw:
            errors.append(f'optimizer.type is missing: give one of {_SUPPORTED}, e.g. "AdamW"')
        return None
    canonical = OPTIMIZER_TYPES.get(name.lower())
    if canonical is None:
        errors.append(_unknown_type(name))
        return None
    given = dict(block["params"] or {})
    if "max_grad_norm" in given:
        del given["max_grad_norm"]
        errors.append(
            "optimizer.params.max_grad_norm: gradient clipping is configured with the top-level "
            '"gradient_clipping" key (DeepSpeed rejects this key too); move the value there'
        )
    n_errors = len(errors)
    params = parse_block(given, "optimizer.params", OPTIMIZER_PARAMS[canonical], errors)
    if canonical == "AdamW" and given.get("adam_w_mode") is False:
        warn(
            'optimizer: "type": "AdamW" always decouples weight decay, so adam_w_mode: false is '
            'ignored (as in DeepSpeed); use "type": "Adam" with adam_w_mode: false for L2 decay'
        )
    if canonical == "SGD" and params["nesterov"] and (
        params["momentum"] <= 0 or params["dampening"] != 0
    ):
        errors.append(
            f"optimizer.params.nesterov: Nesterov momentum needs momentum > 0 and dampening 0, "
            f"got momentum={params['momentum']:g}, dampening={params['dampening']:g}"
        )
    if len(errors) > n_errors:
        return None
    return OptimizerConfig(canonical, params)


def parse_scheduler(
    raw: dict[str, Any], optimizer: OptimizerConfig | None, errors: list[str]
) -> SchedulerConfig | None:
    """Validate a ``"scheduler"`` block and resolve its computable ``"auto"`` values.

    ``warmup_min_lr: "auto"`` becomes 0 and ``warmup_max_lr: "auto"`` the optimizer's lr, which
    is what the HF Trainer writes; any other ``"auto"`` needs a concrete value. Names are checked
    here (with suggestions); values by building the schedule once with
    ``funczero.optim.schedules.from_deepspeed``.
    """
    from funczero.optim.deepspeed_schedules import DEEPSPEED_SCHEDULES

    block = parse_block(raw, "scheduler", SCHEDULER_BLOCK, errors)
    name = block["type"]
    if name is None:
        if "type" not in raw:
            errors.append('scheduler.type is missing: e.g. "WarmupLR" or "WarmupDecayLR"')
        return None
    if name not in DEEPSPEED_SCHEDULES:
        errors.append(
            f"scheduler.type {show(name)} is not a DeepSpeed schedule funczero implements"
            f"{did_you_mean(name, DEEPSPEED_SCHEDULES)} (valid, case-sensitive as in DeepSpeed: "
            f"{', '.join(DEEPSPEED_SCHEDULES)})"
        )
        return None
    valid = (*DEEPSPEED_SCHEDULES[name], "last_batch_iteration")
    params: dict[str, Any] = {}
    n_errors = len(errors)
    for key, value in (block["params"] or {}).items():
        if key not in valid:
            errors.append(unknown_key(f"scheduler.params.{key}", key, list(valid), {}))
        elif not (isinstance(value, str) and value == "auto"):
            params[key] = value
        elif key == "warmup_min_lr":
            params[key] = 0.0
        elif key == "warmup_max_lr" and optimizer is not None:
            params[key] = optimizer.lr
        else:
            source = (
                "it is the optimizer's lr, but there is no optimizer block"
                if key == "warmup_max_lr"
                else "the HF Trainer computes it from its own arguments"
            )
            errors.append(f'scheduler.params.{key} is "auto" ({source}); set a concrete value')
    if len(errors) > n_errors:
        return None
    scheduler = SchedulerConfig(name, params)
    try:  # validate values now rather than at the first step
        scheduler.build(base_lr=optimizer.lr if optimizer is not None else 1e-3)
    except ConfigError as e:
        errors.extend(e.problems)
        return None
    return scheduler
