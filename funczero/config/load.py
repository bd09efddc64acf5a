"""``Config``: a DeepSpeed JSON config, validated strictly and resolved into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from funczero.config.batch import resolve_batch
from funczero.config.errors import ConfigError
from funczero.config.keys import (
    BF16,
    DATA_TYPES,
    FP16,
    FUNCZERO,
    TOP,
    UNSUPPORTED_FEATURES,
    default,
)
from funczero.config.source import ELSEWHERE, parse_zero, read_source, world_size_from
from funczero.config.optimizer import (
    OptimizerConfig,
    SchedulerConfig,
    parse_optimizer,
    parse_scheduler,
)
from funczero.config.schema import AUTO, parse_block
from funczero.config.sections import BF16Config, FP16Config, FunczeroConfig, ZeroConfig

if TYPE_CHECKING:
    from funczero.train.loss_scale import LossScaleConfig
    from funczero.optim import Optimizer
    from funczero.optim.schedules import Schedule
    from funczero.parallel.precision import Precision

__all__ = ["Config"]


@dataclasses.dataclass(frozen=True)
class Config:
    """A resolved DeepSpeed-compatible training config.

    Build it with :meth:`load` from a dict, a JSON file (comments and trailing commas allowed)
    or DeepSpeed's base64 form. Every key at every level is checked: unknown keys, wrong types
    and unsupported values are errors naming the full key path, with the closest valid key.

    Attributes:
        train_batch_size: samples per optimizer step over all ranks.
        train_micro_batch_size_per_gpu: samples per forward/backward on one rank.
        gradient_accumulation_steps: micro-batches per optimizer step.
        world_size: the data-parallel size the batch keys were resolved with.
        optimizer: the optimizer block, or ``None`` (then pass one to ``funczero.initialize``).
        scheduler: the scheduler block, or ``None``.
        fp16, bf16, zero, funczero: the sub-blocks.
        gradient_clipping: global-norm clip of the unscaled gradients; 0 disables.
        steps_per_print: logging period in optimizer steps; ``None`` disables it.
        wall_clock_breakdown, communication_data_type, prescale_gradients,
        gradient_predivide_factor, zero_allow_untested_optimizer, dataloader_drop_last: as in
            DeepSpeed (docs/config.md).
        raw: the input as given (after comment stripping). Not part of equality.

    Example:
        >>> cfg = Config.load({"train_micro_batch_size_per_gpu": 4,
        ...                    "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
        ...                    "zero_optimization": {"stage": 2}}, world_size=4)
        >>> cfg.train_batch_size, cfg.precision, cfg.zero.stage, cfg.zero.overlap_comm
        (32, 'bf16', 2, False)
    """

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    world_size: int
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    fp16: FP16Config = dataclasses.field(default_factory=FP16Config)
    bf16: BF16Config = dataclasses.field(default_factory=BF16Config)
    zero: ZeroConfig = dataclasses.field(default_factory=ZeroConfig)
    gradient_clipping: float = default("gradient_clipping")
    steps_per_print: int | None = default("steps_per_print")
    wall_clock_breakdown: bool = default("wall_clock_breakdown")
    communication_data_type: str | None = default("communication_data_type")
    prescale_gradients: bool = default("prescale_gradients")
    gradient_predivide_factor: float = default("gradient_predivide_factor")
    zero_allow_untested_optimizer: bool = default("zero_allow_untested_optimizer")
    dataloader_drop_last: bool = default("dataloader_drop_last")
    funczero: FunczeroConfig = dataclasses.field(default_factory=FunczeroConfig)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        tbs, mbs, gas, w = (self.train_batch_size, self.train_micro_batch_size_per_gpu,
                            self.gradient_accumulation_steps, self.world_size)
        if tbs != mbs * gas * w:
            raise ConfigError(
                f"train_batch_size ({tbs}) != train_micro_batch_size_per_gpu ({mbs}) * "
                f"gradient_accumulation_steps ({gas}) * world_size ({w}) = {mbs * gas * w}"
            )
        if self.fp16.enabled and self.bf16.enabled:
            raise ConfigError(
                "fp16.enabled and bf16.enabled are both true; enable one of them "
                "(DeepSpeed refuses this too)"
            )

    # --- construction --------------------------------------------------------------------

    @classmethod
    def load(
        cls, source: Mapping[str, Any] | str | os.PathLike[str], *, world_size: int | None = None
    ) -> Config:
        """Load and validate a DeepSpeed (or funczero) config.

        Args:
            source: a dict; a path to a JSON file, which may contain ``//``, ``/* */`` and ``#``
                comments and trailing commas; or DeepSpeed's url-safe base64 JSON string.
            world_size: the data-parallel size; defaults to ``$WORLD_SIZE`` or 1.

        Returns:
            The resolved config.

        Raises:
            ConfigError: every problem found, each naming its key path and the fix.

        Example:
            >>> Config.load({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4},
            ...             world_size=2).gradient_accumulation_steps
            8
        """
        raw = read_source(source)
        w, w_source = world_size_from(world_size)
        return _build(raw, w, w_source)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, world_size: int | None = None) -> Config:
        """Same as :meth:`load` for a dict."""
        return cls.load(d, world_size=world_size)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, world_size: int | None = None) -> Config:
        """Same as :meth:`load` for a file path."""
        if not Path(path).is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        return cls.load(path, world_size=world_size)

    # --- derived views -------------------------------------------------------------------

    @property
    def precision(self) -> Literal["fp32", "bf16", "fp16"]:
        """``"fp16"`` or ``"bf16"`` when that block is enabled, else ``"fp32"``."""
        return "fp16" if self.fp16.enabled else "bf16" if self.bf16.enabled else "fp32"

    @property
    def seed(self) -> int | None:
        """``funczero.seed``."""
        return self.funczero.seed

    def precision_policy(self) -> Precision:
        """The :class:`funczero.parallel.precision.Precision` for this config."""
        from funczero.parallel.precision import Precision

        return Precision.from_name(self.precision, reduce_dtype=self.communication_data_type)

    def loss_scale_config(self) -> LossScaleConfig:
        """The loss scaler settings: fp16's, or a constant scale of 1 for bf16/fp32."""
        from funczero.train.loss_scale import LossScaleConfig

        if not self.fp16.enabled:
            return LossScaleConfig.disabled()
        return LossScaleConfig.from_fp16(
            self.fp16, raise_at_min_scale=self.funczero.raise_at_min_loss_scale
        )

    def build_schedule(
        self, base_lr: float | None = None
    ) -> tuple[Schedule | float, Schedule | None]:
        """Return ``(learning rate or its schedule, momentum schedule or None)``.

        Args:
            base_lr: the base learning rate; defaults to ``optimizer.params.lr``. Needed when the
                config has a scheduler but no optimizer block.
        """
        if base_lr is None:
            if self.optimizer is None:
                raise ConfigError(
                    "build_schedule: the config has no optimizer block, so pass base_lr= "
                    "(the learning rate of the optimizer the schedule drives)"
                )
            base_lr = self.optimizer.lr
        if self.scheduler is None:
            return base_lr, None
        return self.scheduler.build(base_lr=base_lr)

    def build_optimizer(self) -> Optimizer:
        """Build the configured optimizer, driven by the configured schedule if any.

        Raises:
            ConfigError: there is no ``"optimizer"`` block.

        Example:
            >>> cfg = Config.load({"train_batch_size": 8, "optimizer": {
            ...     "type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}}, world_size=1)
            >>> opt = cfg.build_optimizer()  # funczero.optim.adamw(1e-3, ..., weight_decay=0.1)
        """
        if self.optimizer is None:
            raise ConfigError(
                'build_optimizer: the config has no "optimizer" block. Add one, e.g. '
                '"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}, '
                "or pass an optimizer to funczero.initialize(optimizer=...)"
            )
        lr, momentum = self.build_schedule()
        return self.optimizer.build(lr, momentum)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as DeepSpeed JSON (every key explicit; for checkpoint metadata).

        ``Config.load(cfg.to_dict(), world_size=cfg.world_size) == cfg``. The world size is not a
        key; it is ``train_batch_size / (micro * accumulation)``.
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


def _build(raw: dict[str, Any], world_size: int, world_source: str) -> Config:
    errors: list[str] = [
        f"'{k}': {what} is not supported by funczero; remove the key"
        for k, what in UNSUPPORTED_FEATURES.items()
        if k in raw
    ]
    given = {k: v for k, v in raw.items() if k not in UNSUPPORTED_FEATURES}
    top = parse_block(given, "", TOP, errors, ELSEWHERE)
    fp16 = parse_block(top["fp16"], "fp16", FP16, errors, ELSEWHERE)
    bf16_name = "bfloat16" if "bfloat16" in raw and "bf16" not in raw else "bf16"
    bf16 = parse_block(top["bf16"], bf16_name, BF16, errors, ELSEWHERE)
    zero = parse_zero(top["zero_optimization"], top["allgather_size"], errors)
    parse_block(top["data_types"], "data_types", DATA_TYPES, errors, ELSEWHERE)
    fz = parse_block(top["funczero"], "funczero", FUNCZERO, errors, ELSEWHERE)
    optimizer = None if top["optimizer"] is None else parse_optimizer(top["optimizer"], errors)
    scheduler = None
    if top["scheduler"] is not None:
        scheduler = parse_scheduler(top["scheduler"], optimizer, errors)
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

    def batch_value(name: str) -> int | None:
        return None if top[name] is AUTO else top[name]

    batch_keys = ("train_batch_size", "train_micro_batch_size_per_gpu",
                  "gradient_accumulation_steps")
    if any(e.startswith(batch_keys) for e in errors):
        raise ConfigError(errors)  # a bad batch value already explains the batch problem
    try:
        tbs, mbs, gas = resolve_batch(*map(batch_value, batch_keys), world_size, world_source)
    except ConfigError as e:
        errors.extend(e.problems)
    if errors:
        raise ConfigError(errors)

    def pick(cls: type, values: Mapping[str, Any]) -> Any:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    return Config(
        train_batch_size=tbs,
        train_micro_batch_size_per_gpu=mbs,
        gradient_accumulation_steps=gas,
        world_size=world_size,
        optimizer=optimizer,
        scheduler=scheduler,
        fp16=pick(FP16Config, fp16),
        bf16=pick(BF16Config, bf16),
        zero=pick(ZeroConfig, zero),
        funczero=pick(FunczeroConfig, fz),
        raw=raw,
        **{name: top[name] for name in _TOP_SCALARS},
    )

