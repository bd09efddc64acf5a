"""DeepSpeed's batch-size rule, with exact arithmetic instead of floor division.

The three keys are tied by ``train_batch_size == micro * accumulation * world_size``. Any two
of them (or train_batch_size or micro alone) determine the rest, as in DeepSpeed
(``_set_batch_related_parameters``). DeepSpeed floor-divides when deriving, so a non-divisible
value is silently rounded and the later equality assertion fails with a puzzling message; here a
value that does not divide evenly is rejected up front with the arithmetic and the fix.
"""

from __future__ import annotations

import math

from funczero.config.errors import ConfigError
from funczero.config.keys import MAX_BATCH

__all__ = ["resolve_batch"]

TBS, MBS, GAS = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


def _multiples(divisor: int, near: int) -> str:
    low = max(divisor, near // divisor * divisor)
    high = low + divisor
    return f"{low} or {high}" if low != near else str(high)


def resolve_batch(
    tbs: int | None, mbs: int | None, gas: int | None, world_size: int, world_source: str
) -> tuple[int, int, int]:
    """Derive the missing batch keys and check the three agree.

    Args:
        tbs: ``train_batch_size`` or ``None`` when missing / ``"auto"``.
        mbs: ``train_micro_batch_size_per_gpu`` or ``None``.
        gas: ``gradient_accumulation_steps`` or ``None``.
        world_size: the data-parallel world size ``W``.
        world_source: where ``W`` came from, quoted in errors (e.g. ``"the WORLD_SIZE variable"``).

    Returns:
        ``(train_batch_size, micro_batch, grad_accum)``.

    Raises:
        ConfigError: neither ``tbs`` nor ``mbs`` is given, or the values do not divide evenly.

    Example:
        >>> resolve_batch(64, 4, None, 2, "world_size=")
        (64, 4, 8)
    """
    w = f"world_size {world_size} ({world_source})"
    if tbs is None and mbs is None:
        given = f" (only {GAS}={gas})" if gas is not None else ""
        raise ConfigError(
            f"cannot work out the batch size{given}: give {TBS} or {MBS} (or both), "
            f'as numbers; "auto" needs the other two keys to be concrete'
        )
    if tbs is not None and mbs is not None and gas is not None:
        if tbs != mbs * gas * world_size:
            raise ConfigError(
                f"{TBS} ({tbs}) != {MBS} ({mbs}) * {GAS} ({gas}) * {w} = "
                f"{mbs * gas * world_size}. Fix: set {TBS} to {mbs * gas * world_size}, or drop "
                f"one of the three keys to have it derived"
            )
        return tbs, mbs, gas
    if tbs is not None and mbs is not None:
        return tbs, mbs, _derive(tbs, mbs, world_size, MBS, GAS, w)
    if tbs is not None and gas is not None:
        return tbs, _derive(tbs, gas, world_size, GAS, MBS, w), gas
    if tbs is not None:
        if tbs % world_size:
            raise ConfigError(
                f"{TBS} ({tbs}) is not divisible by {w}: {tbs} / {world_size} = "
                f"{tbs / world_size:.4g} samples per rank (DeepSpeed would floor it to "
                f"{tbs // world_size} and then fail its check). Fix: use a {TBS} that is a "
                f"multiple of {world_size}, e.g. {_multiples(world_size, tbs)}"
            )
        return tbs, tbs // world_size, 1
    assert mbs is not None
    gas = 1 if gas is None else gas
    if mbs * gas * world_size > MAX_BATCH:
        raise ConfigError(
            f"{TBS} = {MBS} ({mbs}) * {GAS} ({gas}) * {w} = {mbs * gas * world_size}, more than "
            f"{MAX_BATCH} samples per step: no real batch is that large; check the batch keys "
            "and the world size"
        )
    return mbs * gas * world_size, mbs, gas


def _derive(
    tbs: int, given: int, world_size: int, given_name: str, missing_name: str, w: str
) -> int:
    """Return ``tbs / (given * world_size)`` or explain why it is not an integer."""
    per_step = given * world_size
    if tbs % per_step:
        fix = f"use a {TBS} that is a multiple of {per_step}, e.g. {_multiples(per_step, tbs)}"
        if tbs % world_size == 0:
            fix += f", or a {given_name} that divides {tbs // world_size}, e.g. " + _divisors_near(
                tbs // world_size, given
            )
        raise ConfigError(
            f"{TBS} ({tbs}) is not divisible by {given_name} ({given}) * {w} = {per_step}: "
            f"{tbs} / {per_step} = {tbs / per_step:.4g}, so {missing_name} cannot be derived "
            f"(DeepSpeed would floor it to {tbs // per_step} and then fail its check). Fix: {fix}"
        )
    return tbs // per_step


def _divisors_near(n: int, x: int) -> str:
    """The divisors of ``n`` closest to ``x`` (at most two), for a suggestion.

    Example:
        >>> _divisors_near(50, 4), _divisors_near(2**31 - 1, 4)
        ('2 or 5', '1 or 2147483647')
    """
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]  # sqrt(n) steps, not n
    divisors = sorted({*small, *(n // d for d in small)}, key=lambda d: (abs(d - x), d))
    return " or ".join(str(d) for d in sorted(divisors[:2]))
