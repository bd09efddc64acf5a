"""``auto_values_from_trainer_args``: the HF Trainer's arguments as ``Config.load``'s ``auto``.

The argument names are the fields of transformers' ``TrainingArguments`` (and the model config's
``hidden_size``); each fills the keys the Trainer fills from it
(:data:`funczero.config.auto.TRAINER_FILLS`).

Example:
    >>> from funczero.config import Config
    >>> template = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    ...             "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    ...             "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    >>> values = auto_values_from_trainer_args(learning_rate=3e-4, per_device_train_batch_size=4,
    ...                                        max_grad_norm=1.0, bf16=True)
    >>> cfg = Config.load(template, world_size=2, auto=values)
    >>> cfg.train_batch_size, cfg.optimizer.lr, cfg.gradient_clipping, cfg.precision
    (8, 0.0003, 1.0, 'bf16')
"""

from __future__ import annotations

import math
from typing import Any

from funczero.config.auto import key_check
from funczero.config.checks import Check, boolean, integer, number
from funczero.config.errors import ConfigError
from funczero.config.keys import SCHEDULER_PARAMS

__all__ = ["auto_values_from_trainer_args"]


def _arg(check: Check, name: str, value: Any) -> Any:
    return None if value is None else check(value, name)


def auto_values_from_trainer_args(
    *,
    learning_rate: float | None = None,
    per_device_train_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    max_grad_norm: float | None = None,
    fp16: bool | None = None,
    bf16: bool | None = None,
    weight_decay: float | None = None,
    adam_beta1: float | None = None,
    adam_beta2: float | None = None,
    adam_epsilon: float | None = None,
    num_training_steps: int | None = None,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """The ``auto`` mapping of :meth:`Config.load` from the HF Trainer's argument names.

    Each argument fills the keys the HF Trainer fills from its ``TrainingArguments`` field of
    the same name (``TRAINER_FILLS``); an argument left ``None`` fills nothing. Exceptions,
    as in the Trainer: giving ``fp16`` or ``bf16`` makes the other false; giving one of
    ``adam_beta1``/``adam_beta2`` gives the other the Trainer's default (0.9 / 0.999);
    ``warmup_num_steps`` is ``warmup_steps`` if > 0, else ``ceil(warmup_ratio *
    num_training_steps)``; ``hidden_size`` (the model config's, the largest of
    ``hidden_sizes``) fills the ZeRO bucket sizes. ``amp.enabled`` is always false (funczero has
    no Apex backend).

    Args:
        learning_rate: ``optimizer.params.lr`` and ``scheduler.params.warmup_max_lr``.
        per_device_train_batch_size: ``train_micro_batch_size_per_gpu`` (and
            ``train_batch_size``, computed with the world size).
        gradient_accumulation_steps: ``gradient_accumulation_steps``.
        max_grad_norm: ``gradient_clipping``.
        fp16: ``fp16.enabled``.
        bf16: ``bf16.enabled``.
        weight_decay: ``optimizer.params.weight_decay``.
        adam_beta1: ``optimizer.params.betas[0]``.
        adam_beta2: ``optimizer.params.betas[1]``.
        adam_epsilon: ``optimizer.params.eps``.
        num_training_steps: ``scheduler.params.total_num_steps``.
        warmup_steps: ``scheduler.params.warmup_num_steps``.
        warmup_ratio: ``scheduler.params.warmup_num_steps`` as a share of
            ``num_training_steps`` (read when ``warmup_steps`` is ``None`` or 0).
        hidden_size: ``zero_optimization.reduce_bucket_size`` (``hidden_size**2``),
            ``stage3_prefetch_bucket_size`` (``int(0.9 * hidden_size**2)``) and
            ``stage3_param_persistence_threshold`` (``10 * hidden_size``).

    Returns:
        ``{key path: value}`` for :meth:`Config.load`'s ``auto``.

    Raises:
        ConfigError: an argument has a value its key does not accept (named by the argument), or
            ``warmup_ratio`` is given without ``num_training_steps``.

    Example:
        >>> auto_values_from_trainer_args(learning_rate=1e-4, bf16=True, hidden_size=8)
        ... # doctest: +NORMALIZE_WHITESPACE
        {'optimizer.params.lr': 0.0001, 'scheduler.params.warmup_max_lr': 0.0001,
         'fp16.enabled': False, 'bf16.enabled': True, 'amp.enabled': False,
         'zero_optimization.reduce_bucket_size': 64,
         'zero_optimization.stage3_prefetch_bucket_size': 57,
         'zero_optimization.stage3_param_persistence_threshold': 80}
    """
    direct = {  # argument: (its value, the keys it fills, its check)
        "learning_rate": (learning_rate, ("optimizer.params.lr", "scheduler.params.warmup_max_lr"),
                          SCHEDULER_PARAMS["warmup_min_lr"].check),  # a float32 learning rate
        "per_device_train_batch_size": (per_device_train_batch_size,
                                        ("train_micro_batch_size_per_gpu",), None),
        "gradient_accumulation_steps": (gradient_accumulation_steps,
                                        ("gradient_accumulation_steps",), None),
        "max_grad_norm": (max_grad_norm, ("gradient_clipping",), None),
        "weight_decay": (weight_decay, ("optimizer.params.weight_decay",), None),
        "adam_epsilon": (adam_epsilon, ("optimizer.params.eps",), None),
        "num_training_steps": (num_training_steps, ("scheduler.params.total_num_steps",), None),
    }
    out: dict[str, Any] = {}
    for name, (value, paths, check) in direct.items():
        if value is not None:
            checked = (check or key_check(paths[0]))(value, name)
            out.update(dict.fromkeys(paths, checked))
    if fp16 is not None or bf16 is not None:  # the Trainer's defaults are false
        out["fp16.enabled"] = _arg(boolean(), "fp16", fp16) or False
        out["bf16.enabled"] = _arg(boolean(), "bf16", bf16) or False
    out["amp.enabled"] = False
    if adam_beta1 is not None or adam_beta2 is not None:
        beta = number(ge=0, lt=1)
        out["optimizer.params.betas"] = [
            0.9 if adam_beta1 is None else beta(adam_beta1, "adam_beta1"),
            0.999 if adam_beta2 is None else beta(adam_beta2, "adam_beta2"),
        ]
    warmup = _warmup_num_steps(warmup_steps, warmup_ratio, num_training_steps)
    if warmup is not None:
        out["scheduler.params.warmup_num_steps"] = warmup
    if hidden_size is not None:
        h = integer(ge=1)(hidden_size, "hidden_size")
        out["zero_optimization.reduce_bucket_size"] = h * h
        # The Trainer writes 0.9 * h * h, a float; the key counts elements.
        out["zero_optimization.stage3_prefetch_bucket_size"] = int(0.9 * h * h)
        out["zero_optimization.stage3_param_persistence_threshold"] = 10 * h
    return out


def _warmup_num_steps(
    warmup_steps: int | None, warmup_ratio: float | None, num_training_steps: int | None
) -> int | None:
    """``TrainingArguments.get_warmup_steps``: the steps if > 0, else the ratio of the total."""
    steps = _arg(integer(ge=0), "warmup_steps", warmup_steps)
    ratio = _arg(number(ge=0, le=1), "warmup_ratio", warmup_ratio)
    if steps is not None and (steps > 0 or ratio is None):
        return steps
    if ratio is None:
        return None
    if num_training_steps is None:
        raise ConfigError(
            "warmup_ratio needs num_training_steps= (the warmup is "
            "ceil(warmup_ratio * num_training_steps) steps), or give warmup_steps= instead"
        )
    return math.ceil(ratio * num_training_steps)
