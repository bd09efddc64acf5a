"""The ``optimizer`` and ``scheduler`` blocks: parsing them into plain data.

``funczero.from_config`` builds the optimizer and schedules from the result.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from funczero.config.errors import ConfigError, closest, did_you_mean, join_path, show, warn
from funczero.config.keys import (
    OPTIMIZER_BLOCK,
    OPTIMIZER_PARAMS,
    OPTIMIZER_TYPES,
    SCHEDULER_BLOCK,
    SCHEDULER_PARAMS,
    UNSUPPORTED_OPTIMIZERS,
)
from funczero.config.schema import parse_block, unknown_key

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

    def to_dict(self) -> dict[str, Any]:
        """The block in DeepSpeed JSON form (lists instead of tuples)."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return {"type": self.type, "params": params}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A ``"scheduler"`` block, with the ``"auto"`` values that can be computed resolved.

    Each value is checked against :data:`funczero.config.keys.SCHEDULER_PARAMS`; which
    parameters a type takes, and their combination, by building the schedule once with
    ``funczero.optim.schedules.from_deepspeed`` (the schedule implementation owns its parameter
    set). ``funczero.from_config.schedule_from_config`` builds it for training.

    Attributes:
        type: the DeepSpeed schedule name as given (``WarmupLR``, ``WarmupDecayLR``,
            ``WarmupCosineLR``, ``OneCycle``, ``LRRangeTest``).
        params: its parameters. Treat as read-only.
    """

    type: str
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The block in DeepSpeed JSON form."""
        return {"type": self.type, "params": dict(self.params)}


# torch.optim's optimizers, which DeepSpeed builds by name (a fixed list: the config layer does
# not import torch; a newer torch name just gets the generic "not a known optimizer" message)
_TORCH_OPTIMIZERS = frozenset({
    "ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon",
    "NAdam", "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam",
})


def _unknown_type(name: str) -> str:
    lower = name.lower()
    if lower in UNSUPPORTED_OPTIMIZERS:
        return (
            f"optimizer.type {show(name)}: DeepSpeed's {UNSUPPORTED_OPTIMIZERS[lower]} is not "
            f"supported by funczero; supported types: {_SUPPORTED}"
        )
    if name in _TORCH_OPTIMIZERS:
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
    raw: dict[str, Any],
    optimizer: OptimizerConfig | None,
    errors: list[str],
    *,
    optimizer_given: bool,
    incomplete: bool = False,
) -> SchedulerConfig | None:
    """Validate a ``"scheduler"`` block and resolve its computable ``"auto"`` values.

    ``warmup_min_lr: "auto"`` becomes 0 and ``warmup_max_lr: "auto"`` the optimizer's lr, which
    is what the HF Trainer writes (the values of ``Config.load``'s ``auto`` were filled in
    before). Names are checked here (with suggestions), each value against ``SCHEDULER_PARAMS``
    (a value that cannot train, such as a negative or infinite learning rate, is an error naming
    its key), and the whole block by building the schedule once with
    ``funczero.optim.schedules.from_deepspeed``. ``warmup_num_steps: 0`` is stored as 1:
    DeepSpeed warms up over ``max(2, warmup_num_steps)`` steps, so both are the same schedule.

    Args:
        raw: the block as given.
        optimizer: the parsed optimizer block (``None`` when absent or invalid).
        errors: problems are appended here.
        optimizer_given: whether the config has an optimizer block (valid or not), so that an
            ``"auto"`` learning rate is explained correctly.
        incomplete: ``"auto"`` parameters were removed for want of a value (and reported), so
            the combination is not checked and ``None`` is returned.
    """
    from funczero.optim.deepspeed_schedules import DEEPSPEED_SCHEDULES
    from funczero.optim.schedules import from_deepspeed

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
    n_errors = len(errors)
    params = _scheduler_params(name, block["params"] or {}, DEEPSPEED_SCHEDULES[name], optimizer,
                               optimizer_given, errors)
    if len(errors) > n_errors or incomplete:
        return None
    try:  # validate the combination now rather than at the first step
        from_deepspeed(name, params, base_lr=optimizer.lr if optimizer is not None else 1e-3)
    except (TypeError, ValueError) as e:
        errors.append(f"scheduler.params ({name}): {e}")
        return None
    return SchedulerConfig(name, params)


def _scheduler_params(
    name: str,
    given: dict[str, Any],
    valid_names: tuple[str, ...],
    optimizer: OptimizerConfig | None,
    optimizer_given: bool,
    errors: list[str],
) -> dict[str, Any]:
    """Check each parameter's name and value; resolve ``"auto"`` where it is computable."""
    valid = [*valid_names, "last_batch_iteration"]
    params: dict[str, Any] = {}
    for key, value in given.items():
        path = join_path("scheduler.params", key)
        if key not in valid:
            errors.append(unknown_key(path, key, valid, {}))
        elif not (isinstance(value, str) and value == "auto"):
            try:
                params[key] = SCHEDULER_PARAMS[key].check(value, path)
            except ConfigError as e:
                errors.extend(e.problems)
            if key == "warmup_num_steps" and params.get(key) == 0:
                params[key] = 1  # DeepSpeed's max(2, n): the same schedule, and a valid count
        elif key == "warmup_min_lr":
            params[key] = 0.0
        elif key == "warmup_max_lr" and optimizer is not None:
            params[key] = optimizer.lr
        elif key == "warmup_max_lr":
            # Without an optimizer block Config.load's auto step has reported (and removed) it.
            why = (
                "the optimizer block has errors (listed with it); fix them"
                if optimizer_given
                else "there is no optimizer block; add one"
            )
            errors.append(
                f'{path} is "auto", which means the optimizer\'s lr, but {why} or set a '
                "concrete value"
            )
        else:  # the keys the HF Trainer fills were filled or reported by Config.load's auto step
            errors.append(
                f'{path} is "auto", but no HF Trainer fills this key ("auto" is not one of its '
                f"values); set {SCHEDULER_PARAMS[key].check.describe}"
            )
    return params
