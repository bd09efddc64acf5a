"""Hugging Face ``"auto"``: the keys the HF Trainer fills in, and filling them from a mapping.

The HF Trainer replaces ``"auto"`` in a DeepSpeed config before DeepSpeed sees it, with values
from its ``TrainingArguments`` and the model (transformers'
``HfTrainerDeepSpeedConfig.trainer_config_process`` and ``trainer_config_finalize``).
``Config.load(source, auto={key path: value})`` does the same (:func:`fill_auto`), and
:func:`funczero.config.trainer_args.auto_values_from_trainer_args` builds that mapping from the
Trainer's argument names. :data:`TRAINER_FILLS` lists every key the Trainer fills, what fills it,
and what ``"auto"`` means when no value is given.

Example:
    >>> from funczero.config import Config
    >>> template = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    ...             "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    ...             "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    >>> values = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
    ...           "bf16.enabled": True, "optimizer.params.lr": 3e-4}
    >>> cfg = Config.load(template, world_size=2, auto=values)
    >>> cfg.train_batch_size, cfg.optimizer.lr, cfg.gradient_clipping, cfg.precision
    (8, 0.0003, 1.0, 'bf16')
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from funczero.config.checks import Check, boolean, integer
from funczero.config.errors import ConfigError, did_you_mean, show
from funczero.config.keys import KEYS, MAX_BATCH, OPTIMIZER_PARAMS, SCHEDULER_PARAMS, SECTIONS
from funczero.config.schema import Status

__all__ = ["TRAINER_FILLS", "AutoFilled", "TrainerFill", "fill_auto", "key_check"]

_HELPER = "auto_values_from_trainer_args"


@dataclasses.dataclass(frozen=True)
class TrainerFill:
    """One key the HF Trainer fills when it is ``"auto"``.

    Attributes:
        path: the key's dotted path.
        arguments: the ``auto_values_from_trainer_args`` arguments that give the value.
        formula: how the Trainer computes it from its arguments.
        without: what ``"auto"`` means when ``auto`` has no value for the key.
        ask: for a key that cannot stay ``"auto"`` without a value, what to pass; ``""`` for
            the others.
        checked: like the Trainer, a concrete config value that differs from ``auto``'s value is
            an error (the Trainer's ``fill_match``; ``False`` for its ``fill_only`` keys).
    """

    path: str
    arguments: str
    formula: str
    without: str
    ask: str = ""
    checked: bool = True


_BATCH = "computed from the other two batch keys and the world size"
_NEEDED = "an error listing it"
_HIDDEN = "hidden_size"
_MICRO = "per_device_train_batch_size"

TRAINER_FILLS: Mapping[str, TrainerFill] = {f.path: f for f in (
    TrainerFill("train_micro_batch_size_per_gpu", _MICRO, _MICRO,
                _BATCH + "; an error listing it when neither it nor train_batch_size is given",
                ask=f"{_MICRO}="),
    TrainerFill("gradient_accumulation_steps", "gradient_accumulation_steps",
                "gradient_accumulation_steps", _BATCH),
    TrainerFill("train_batch_size", f"{_MICRO}, gradient_accumulation_steps",
                f"world_size * {_MICRO} * gradient_accumulation_steps",
                _BATCH + "; an error listing it when neither it nor the micro-batch is given",
                ask=f"{_MICRO}= (it is then world_size * {_MICRO} * accumulation)"),
    TrainerFill("gradient_clipping", "max_grad_norm", "max_grad_norm", _NEEDED,
                ask="max_grad_norm="),
    TrainerFill("optimizer.params.lr", "learning_rate", "learning_rate", _NEEDED,
                ask="learning_rate="),
    TrainerFill("optimizer.params.betas", "adam_beta1, adam_beta2", "[adam_beta1, adam_beta2]",
                "the default [0.9, 0.999] (the Trainer's defaults too)"),
    TrainerFill("optimizer.params.eps", "adam_epsilon", "adam_epsilon",
                "the default 1e-8 (the Trainer's default too)"),
    TrainerFill("optimizer.params.weight_decay", "weight_decay", "weight_decay",
                "the default 0 (the Trainer's default too)"),
    TrainerFill("scheduler.params.warmup_min_lr", "(none)", "0", "0, as the Trainer writes",
                checked=False),
    TrainerFill("scheduler.params.warmup_max_lr", "learning_rate", "learning_rate",
                "the optimizer block's lr; without an optimizer block, " + _NEEDED,
                ask="learning_rate= (or add an optimizer block: its lr is then the value)"),
    TrainerFill("fp16.enabled", "fp16", "fp16 or fp16_full_eval (amp backend)", _NEEDED,
                ask="fp16= or bf16= (giving one makes the other false)"),
    TrainerFill("amp.enabled", "(none: always false, funczero has no Apex backend)",
                'fp16_backend == "apex"', _NEEDED,
                ask=f'any {_HELPER}(...) call gives false; or write "enabled": false',
                checked=False),
    TrainerFill("bf16.enabled", "bf16", "bf16 or bf16_full_eval", _NEEDED,
                ask="bf16= or fp16= (giving one makes the other false)"),
    TrainerFill("zero_optimization.reduce_bucket_size", _HIDDEN, "hidden_size * hidden_size",
                "the default", checked=False),
    TrainerFill("zero_optimization.stage3_prefetch_bucket_size", _HIDDEN,
                "int(0.9 * hidden_size * hidden_size)",
                "the default, with a value too (funczero ignores the key)", checked=False),
    TrainerFill("zero_optimization.stage3_param_persistence_threshold", _HIDDEN,
                "10 * hidden_size", "the default", checked=False),
    TrainerFill("scheduler.params.total_num_steps", "num_training_steps", "num_training_steps",
                _NEEDED, ask="num_training_steps="),
    TrainerFill("scheduler.params.warmup_num_steps", "warmup_steps, warmup_ratio",
                "warmup_steps if > 0, else ceil(warmup_ratio * num_training_steps)", _NEEDED,
                ask="warmup_steps=, or warmup_ratio= with num_training_steps="),
)}
"""Every key the HF Trainer fills when it is ``"auto"``, in the Trainer's order."""

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def key_check(path: str) -> Check:
    """The check of the key at ``path`` (optimizer params: AdamW's, the Trainer's optimizer)."""
    if path.startswith("optimizer.params."):
        return OPTIMIZER_PARAMS["AdamW"][path.removeprefix("optimizer.params.")].check
    if path.startswith("scheduler.params."):
        return SCHEDULER_PARAMS[path.removeprefix("scheduler.params.")].check
    if path == "amp.enabled":
        return boolean()
    if path in _BATCH_KEYS:  # a value for "auto" is a number, not null
        return integer(ge=1, le=MAX_BATCH)
    return KEYS[path].check


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


@dataclasses.dataclass(frozen=True)
class AutoFilled:
    """The config with ``"auto"`` filled in, and what could not be filled.

    Attributes:
        config: a copy of the config, every filled ``"auto"`` replaced by its value and every
            unfilled needed one removed (so that only one problem reports it).
        unfilled: the paths of needed ``"auto"`` values nothing filled, in :data:`TRAINER_FILLS`
            order.
        problems: one message listing ``unfilled`` and what fills each, then any conflicts
            between the config's concrete values and ``auto``'s; empty when all is well.
    """

    config: dict[str, Any]
    unfilled: tuple[str, ...]
    problems: tuple[str, ...]


def fill_auto(
    raw: Mapping[str, Any], auto: Mapping[str, Any] | None, world_size: int
) -> AutoFilled:
    """Replace the config's ``"auto"`` values by ``auto``'s, as the HF Trainer does.

    Args:
        raw: the config as read (not modified).
        auto: ``{key path: value}`` for keys of :data:`TRAINER_FILLS`, or ``None``.
        world_size: the data-parallel size (``train_batch_size`` is computed with it).

    Returns:
        The filled copy and what could not be filled (see :class:`AutoFilled`).

    Raises:
        ConfigError: ``auto`` is not a mapping, names a key the Trainer does not fill, or holds
            a value the key does not accept.

    Example:
        >>> filled = fill_auto({"gradient_clipping": "auto", "train_batch_size": 8}, None, 1)
        >>> filled.unfilled, "gradient_clipping" in filled.config
        (('gradient_clipping',), False)
    """
    values = _checked_mapping(auto)
    config = copy.deepcopy(dict(raw))
    problems: list[str] = []
    for path, value in values.items():
        spot = _locate(config, path)
        if spot is None:
            continue  # the Trainer fills nothing that is absent either
        node, name = spot
        if _is_auto(node[name]):
            if KEYS.get(path) is None or KEYS[path].status is not Status.IGNORED:
                node[name] = value  # an ignored key keeps "auto", that is its default: no warning
        elif TRAINER_FILLS[path].checked and not _same(node[name], value):
            problems.append(
                f"{path} is {show(node[name])} in the config but auto gives {show(value)} "
                f"({TRAINER_FILLS[path].arguments}); make them agree or write \"auto\" in the "
                "config (the HF Trainer refuses this mismatch too)"
            )
    _fill_train_batch_size(config, values, world_size)
    unfilled = [path for path in TRAINER_FILLS if _unfilled(config, path)]
    for path in unfilled:
        spot = _locate(config, path)
        assert spot is not None
        del spot[0][spot[1]]
    if unfilled:
        problems.insert(0, _unfilled_message(unfilled))
    return AutoFilled(config, tuple(unfilled), tuple(problems))


def _checked_mapping(auto: Mapping[str, Any] | None) -> dict[str, Any]:
    if auto is None:
        return {}
    if not isinstance(auto, Mapping):
        raise ConfigError(
            f"auto: expected a mapping {{key path: value}}, e.g. from {_HELPER}(...), "
            f"got {type(auto).__name__}"
        )
    problems: list[str] = []
    values: dict[str, Any] = {}
    for path, value in auto.items():
        if path not in TRAINER_FILLS:
            hint = did_you_mean(str(path), TRAINER_FILLS) or (
                f"; the keys it fills: {', '.join(TRAINER_FILLS)}"
            )
            problems.append(f"auto: {show(path)} is not a key the HF Trainer fills{hint}")
            continue
        try:
            values[path] = key_check(path)(value, f"auto[{path!r}]")
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return values


def _aliases(prefix: str) -> dict[str, str]:
    return {name: key.alias for name, key in SECTIONS.get(prefix, {}).items() if key.alias}


def _locate(config: dict[str, Any], path: str) -> tuple[dict[str, Any], str] | None:
    """The object holding the key at ``path`` and the spelling used there (aliases such as
    ``bfloat16`` or ``prefetch_bucket_size`` count), or ``None`` when it is absent."""
    node: Any = config
    prefix = ""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return None
        alias = _aliases(prefix).get(part)
        name = part if part in node or alias not in node else alias
        if name not in node:
            return None
        if i == len(parts) - 1:
            return node, name
        node = node[name]
        prefix = f"{prefix}.{part}" if prefix else part
    return None


def _same(a: Any, b: Any) -> bool:
    """JSON equality with numbers compared by value (``1 == 1.0``) but ``true != 1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _concrete(config: dict[str, Any], path: str) -> Any:
    spot = _locate(config, path)
    if spot is None:
        return None
    value = spot[0][spot[1]]
    return None if _is_auto(value) else value


def _fill_train_batch_size(
    config: dict[str, Any], values: Mapping[str, Any], world_size: int
) -> None:
    """``train_batch_size: "auto"`` without a micro-batch key: the Trainer's formula.

    With a micro-batch key the batch rule derives it (and checks the three agree). The
    accumulation is the config's (the Trainer would insist they agree), else ``auto``'s, else 1.
    """
    micro = values.get("train_micro_batch_size_per_gpu")
    if micro is None or "train_micro_batch_size_per_gpu" in config:
        return
    if not _is_auto(config.get("train_batch_size")):
        return
    accumulation = _concrete(config, "gradient_accumulation_steps")
    try:  # a bad value is reported by its own check; the batch rule then says the rest
        accumulation = integer(ge=1)(accumulation, "gradient_accumulation_steps")
    except ConfigError:
        accumulation = values.get("gradient_accumulation_steps", 1)
    config["train_batch_size"] = world_size * micro * accumulation


def _unfilled(config: dict[str, Any], path: str) -> bool:
    """Whether ``path`` is ``"auto"`` and nothing gives its value."""
    spot = _locate(config, path)
    if spot is None or not _is_auto(spot[0][spot[1]]):
        return False
    if path in _BATCH_KEYS:  # derivable when train_batch_size or the micro-batch is concrete
        return path != "gradient_accumulation_steps" and all(
            _concrete(config, k) is None for k in _BATCH_KEYS[:2]
        )
    if path == "scheduler.params.warmup_max_lr":
        return config.get("optimizer") is None  # else the optimizer block's lr gives it
    return bool(TRAINER_FILLS[path].ask)


def _unfilled_message(paths: list[str]) -> str:
    lines = "\n".join(f"  {path}: {TRAINER_FILLS[path].ask}" for path in paths)
    return (
        f'{len(paths)} "auto" value{"s" if len(paths) > 1 else ""} that only the HF Trainer '
        f"fills in got no value. Pass Config.load(..., auto=funczero.config.{_HELPER}(...)) "
        f"with these arguments, or write concrete values in the config:\n{lines}"
    )
