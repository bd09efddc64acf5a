"""``Config``: a DeepSpeed JSON config, validated strictly and resolved into frozen plain data.

``Config.load`` is the one constructor: every ``Config`` that exists passed every check. The
runtime objects a config describes (optimizer, schedule, precision policy, loss scaler) are built
by :mod:`funczero.from_config`; this package imports nothing of the runtime.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Literal

from funczero.config.auto import AutoFilled, fill_auto
from funczero.config.batch import resolve_batch
from funczero.config.errors import ConfigError
from funczero.config.keys import (
    BF16,
    DATA_TYPES,
    FP16,
    FUNCZERO,
    KEY_HOMES,
    SECTIONS,
    TOP,
    UNSUPPORTED_FEATURES,
)
from funczero.config.optimizer import (
    OptimizerConfig,
    SchedulerConfig,
    parse_optimizer,
    parse_scheduler,
)
from funczero.config.schema import AUTO, parse_block
from funczero.config.sections import BF16Config, FP16Config, FunczeroConfig, ZeroConfig, parse_zero
from funczero.config.source import read_source, world_size_from
from funczero.monitors.settings import BLOCKS as MONITOR_BLOCKS
from funczero.monitors.settings import MonitorSettings

__all__ = ["Config"]


@dataclasses.dataclass(frozen=True, init=False)
class Config:
    """A resolved DeepSpeed-compatible training config: frozen plain data.

    Build it with :meth:`load` (its only constructor) from a dict, a JSON file (comments and
    trailing commas allowed) or DeepSpeed's base64 form. Every key at every level is checked:
    unknown keys, wrong types and unsupported values are errors naming the full key path, with
    the closest valid key. To change a loaded config, load ``cfg.to_dict()`` with your changes.

    Attributes:
        train_batch_size: samples per optimizer step over all ranks.
        train_micro_batch_size_per_gpu: samples per forward/backward on one rank.
        gradient_accumulation_steps: micro-batches per optimizer step.
        world_size: the data-parallel size the batch keys were resolved with.
        optimizer: the optimizer block, or ``None`` (then pass one to ``funczero.initialize``).
        scheduler: the scheduler block, or ``None``.
        fp16, bf16, zero, funczero: the sub-blocks.
        gradient_clipping: global-norm clip of the unscaled gradients; 0 disables.
        steps_per_print: a logging period for your training loop (funczero's step does not log).
        wall_clock_breakdown, communication_data_type, prescale_gradients,
        gradient_predivide_factor, zero_allow_untested_optimizer, dataloader_drop_last: as in
            DeepSpeed (docs/config.md says which of them funczero ignores).
        raw: the input as given (after comment stripping). Not part of equality.

    Example:
        >>> cfg = Config.load({"train_micro_batch_size_per_gpu": 4,
        ...                    "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
        ...                    "zero_optimization": {"stage": 2}}, world_size=4)
        >>> cfg.train_batch_size, cfg.precision, cfg.zero.stage, cfg.zero.overlap_comm
        (32, 'bf16', 2, False)
        >>> Config(train_batch_size=8)
        Traceback (most recent call last):
        ...
        TypeError: Config has one constructor: Config.load(source, world_size=...) ...
    """

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    world_size: int
    optimizer: OptimizerConfig | None
    scheduler: SchedulerConfig | None
    fp16: FP16Config
    bf16: BF16Config
    zero: ZeroConfig
    gradient_clipping: float
    steps_per_print: int | None
    wall_clock_breakdown: bool
    communication_data_type: str | None
    prescale_gradients: bool
    gradient_predivide_factor: float
    zero_allow_untested_optimizer: bool
    dataloader_drop_last: bool
    funczero: FunczeroConfig
    monitors: MonitorSettings
    activation_checkpointing: dict[str, Any] | None
    compile: dict[str, Any]
    raw: dict[str, Any] = dataclasses.field(compare=False, repr=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Also what dataclasses.replace() reaches: a changed copy would skip every check.
        raise TypeError(
            "Config has one constructor: Config.load(source, world_size=...) (it checks every "
            "key); to change a loaded config, load cfg.to_dict() with your changes"
        )

    @classmethod
    def load(
        cls,
        source: Mapping[str, Any] | str | os.PathLike[str],
        *,
        world_size: int | None = None,
        auto: Mapping[str, Any] | None = None,
    ) -> Config:
        """Load and validate a DeepSpeed (or funczero) config.

        Args:
            source: a dict; a path to a JSON file, which may contain ``//``, ``/* */`` and ``#``
                comments and trailing commas; or DeepSpeed's url-safe base64 JSON string.
            world_size: the data-parallel size; defaults to ``$WORLD_SIZE`` or 1.
            auto: the values the HF Trainer would fill in for ``"auto"``, ``{key path: value}``
                (:func:`funczero.config.auto_values_from_trainer_args` builds it). ``"auto"``
                values it does not give keep their own meaning (docs/config.md, "auto").

        Returns:
            The resolved config.

        Raises:
            ConfigError: every problem found, each naming its key path and the fix. Nothing
                else: unreadable files, bad bytes, absurd nesting or numbers are ConfigErrors too.

        Example:
            >>> Config.load({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4},
            ...             world_size=2).gradient_accumulation_steps
            8
        """
        raw = read_source(source)
        w, w_source = world_size_from(world_size)
        return _resolve(raw, fill_auto(raw, auto, w), w, w_source)

    # --- derived views -------------------------------------------------------------------

    @property
    def precision(self) -> Literal["fp32", "bf16", "fp16"]:
        """``"fp16"`` or ``"bf16"`` when that block is enabled, else ``"fp32"``."""
        return "fp16" if self.fp16.enabled else "bf16" if self.bf16.enabled else "fp32"

    @property
    def seed(self) -> int | None:
        """``funczero.seed``."""
        return self.funczero.seed

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as DeepSpeed JSON (every key explicit; for checkpoint metadata).

        ``Config.load(cfg.to_dict(), world_size=cfg.world_size) == cfg``. The world size is not a
        key; it is ``train_batch_size / (micro * accumulation)``.

        Example:
            >>> cfg = Config.load({"train_batch_size": 8}, world_size=2)
            >>> Config.load(cfg.to_dict(), world_size=2) == cfg
            True
        """
        out: dict[str, Any] = {
            "train_batch_size": self.train_batch_size,
            "train_micro_batch_size_per_gpu": self.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer.to_dict()
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler.to_dict()
        out["fp16"] = dataclasses.asdict(self.fp16)
        out["bf16"] = dataclasses.asdict(self.bf16)
        out["zero_optimization"] = dataclasses.asdict(self.zero)
        out.update({name: getattr(self, name) for name in _TOP_SCALARS})
        out["funczero"] = dataclasses.asdict(self.funczero)
        if self.activation_checkpointing is not None:
            out["activation_checkpointing"] = dict(self.activation_checkpointing)
        out["compile"] = dict(self.compile)
        for block in MONITOR_BLOCKS:
            out[block] = dataclasses.asdict(getattr(self.monitors, block))
        return out


# top-level keys that are plain Config fields (the rest are blocks or batch keys)
_TOP_SCALARS = (
    "gradient_clipping",
    "steps_per_print",
    "wall_clock_breakdown",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "zero_allow_untested_optimizer",
    "dataloader_drop_last",
)
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _resolve(
    raw: dict[str, Any], filled: AutoFilled, world_size: int, world_source: str
) -> Config:
    """Check every key of ``filled.config`` and build the Config; raise every problem at once.

    ``raw`` is the config as given, kept as ``Config.raw``.
    """
    config = filled.config
    errors: list[str] = list(filled.problems)
    errors += [
        f"'{k}': {what} is not supported by funczero; remove the key"
        for k, what in UNSUPPORTED_FEATURES.items()
        if k in config
    ]
    given = {k: v for k, v in config.items() if k not in UNSUPPORTED_FEATURES}
    top = parse_block(given, "", TOP, errors, KEY_HOMES)
    blocks = _parse_blocks(config, top, errors, filled.unfilled)
    if any(e.startswith(_BATCH_KEYS) for e in errors) or set(_BATCH_KEYS) & set(filled.unfilled):
        raise ConfigError(errors)  # the batch problem is explained already
    try:
        tbs, mbs, gas = resolve_batch(
            *(None if top[k] is AUTO else top[k] for k in _BATCH_KEYS), world_size, world_source
        )
    except ConfigError as e:
        errors.extend(e.problems)
    if errors:
        raise ConfigError(errors)

    def pick(cls: type, values: Mapping[str, Any]) -> Any:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    values = {
        "train_batch_size": tbs,
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": gas,
        "world_size": world_size,
        "optimizer": blocks["optimizer"],
        "scheduler": blocks["scheduler"],
        "fp16": pick(FP16Config, blocks["fp16"]),
        "bf16": pick(BF16Config, blocks["bf16"]),
        "zero": pick(ZeroConfig, blocks["zero"]),
        "funczero": pick(FunczeroConfig, blocks["funczero"]),
        "monitors": MonitorSettings(
            **{b: pick(MONITOR_BLOCKS[b], blocks[b]) for b in MONITOR_BLOCKS},
            wall_clock_breakdown=top["wall_clock_breakdown"],
        ),
        "activation_checkpointing": blocks["activation_checkpointing"],
        "compile": blocks["compile"],
        "raw": raw,
        **{name: top[name] for name in _TOP_SCALARS},
    }
    cfg = object.__new__(Config)  # the one place a Config is made (Config() refuses)
    for f in dataclasses.fields(Config):
        object.__setattr__(cfg, f.name, values[f.name])
    return cfg


def _parse_blocks(
    raw: dict[str, Any], top: dict[str, Any], errors: list[str], unfilled: tuple[str, ...]
) -> dict[str, Any]:
    """Parse the sub-blocks and check the rules that tie keys of different blocks together.

    ``unfilled``: the paths of "auto" values removed for want of a value (already reported).
    """
    fp16 = parse_block(top["fp16"], "fp16", FP16, errors, KEY_HOMES)
    bf16_name = "bfloat16" if "bfloat16" in raw and "bf16" not in raw else "bf16"
    bf16 = parse_block(top["bf16"], bf16_name, BF16, errors, KEY_HOMES)
    zero = parse_zero(top["zero_optimization"], top["allgather_size"], errors)
    parse_block(top["data_types"], "data_types", DATA_TYPES, errors, KEY_HOMES)
    remat = None
    if top["activation_checkpointing"] is not None:
        remat = parse_block(
            top["activation_checkpointing"], "activation_checkpointing",
            SECTIONS["activation_checkpointing"], errors, KEY_HOMES,
        )  # fmt: skip
    fz = parse_block(top["funczero"], "funczero", FUNCZERO, errors, KEY_HOMES)
    compile_block = parse_block(top["compile"] or {}, "compile", SECTIONS["compile"], errors, KEY_HOMES)
    monitors = {b: parse_block(top[b], b, SECTIONS[b], errors, KEY_HOMES) for b in MONITOR_BLOCKS}
    optimizer = None if top["optimizer"] is None else parse_optimizer(top["optimizer"], errors)
    scheduler = None
    if top["scheduler"] is not None:
        scheduler = parse_scheduler(
            top["scheduler"], optimizer, errors, optimizer_given=raw.get("optimizer") is not None,
            incomplete=any(p.startswith("scheduler.params.") for p in unfilled),
        )
    if fp16["enabled"] and bf16["enabled"]:
        errors.append(
            f"fp16.enabled and {bf16_name}.enabled are both true; enable one of them "
            "(DeepSpeed refuses this too)"
        )
    if fp16["loss_scale"] == 0 and 2.0 ** fp16["initial_scale_power"] < fp16["min_loss_scale"]:
        errors.append(
            f"fp16: the initial dynamic scale 2**initial_scale_power = "
            f"{2.0 ** fp16['initial_scale_power']:g} is below min_loss_scale "
            f"{fp16['min_loss_scale']:g}; raise initial_scale_power or lower min_loss_scale"
        )
    return {"fp16": fp16, "bf16": bf16, "zero": zero, "funczero": fz,
            "optimizer": optimizer, "scheduler": scheduler, "activation_checkpointing": remat,
            "compile": compile_block, **monitors}
