"""Ranks that stop running the same program: errors that name the step, the collective and the unit.

Every rank must issue the same collectives in the same order (SPMD). When one does not (it
skipped a unit, ran another number of micro-batches, got a batch that changes which modules
run), the others wait in a collective that never completes. Two things here turn that into an
error that says where:

* :func:`step_scope` tells funczero's collectives which training step is running, so a failed
  or timed-out collective's :class:`CollectiveError` names the step as well as the collective
  and its unit. It is a host-side integer the caller counts: reading it costs no device sync.
* The opt-in **SPMD check** (``FUNCZERO_SPMD_CHECK=1``, or :func:`set_spmd_check`): before each
  collective, the ranks of its group all-gather a fingerprint of it (step, position in the step,
  and a hash of its kind, unit, size and dtype). Ranks that differ raise a :class:`CollectiveError`
  at once, on every rank, naming each rank's collective: the first divergent one, instead of a
  hang (or a silently wrong result) later. It costs one tiny all-gather and a host sync per
  collective, so it is off by default: a debugging switch, like ``TORCH_DISTRIBUTED_DEBUG``.

The step is process-wide state, not a context variable, because gradient reductions are issued
from autograd's backward threads, which do not see the calling thread's context.

Example:
    >>> with step_scope(7):
    ...     current_step()
    7
    >>> current_step() is None
    True
    >>> previous = set_spmd_check(True)
    >>> spmd_check_enabled()
    True
    >>> _ = set_spmd_check(previous)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "SPMD_CHECK_ENV",
    "CollectiveError",
    "StepCounter",
    "check_same_collective",
    "collective_failed",
    "current_step",
    "rank_and_step",
    "set_spmd_check",
    "spmd_check_enabled",
    "step_scope",
]

SPMD_CHECK_ENV = "FUNCZERO_SPMD_CHECK"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class CollectiveError(RuntimeError):
    """A collective failed, timed out, or (SPMD check) differs between ranks; the message names it.

    The usual cause is ranks that do not run the same program: one rank skipped a unit (a
    data-dependent branch in ``forward``), ran another number of micro-batches, or saw a batch
    that changed which modules run. Every rank must issue the same collectives in the same order.
    """


def _env_flag(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(
        f"{SPMD_CHECK_ENV}={value!r} is not a switch; set it to 1 to compare the ranks' "
        "collectives before each one is issued, or 0 (or leave it unset) to skip the check"
    )


_step: int | None = None
_enabled: bool = _env_flag(os.environ.get(SPMD_CHECK_ENV, ""))
# Checked collectives issued so far in the current step, per process group (by id: groups live
# as long as the job): the fingerprint's position, so a rank one collective behind is caught.
_issued: dict[int, int] = {}


@contextlib.contextmanager
def step_scope(step: int) -> Iterator[None]:
    """Run the block as training step ``step``: collectives' errors name it.

    Meant for the training step, with a step number it counts on the host (never one read from
    a device tensor, which would synchronise). Also restarts the SPMD check's count of
    collectives, so its errors say "collective 3 of step 12".

    Example:
        >>> with step_scope(3):
        ...     with step_scope(4):
        ...         current_step()
        ...     current_step()
        4
        3
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(
            f"step_scope(step={step!r}): the step must be an int >= 0 counted on the host"
        )
    global _step
    outer = _step
    _step, saved = step, dict(_issued)
    _issued.clear()
    try:
        yield
    finally:
        _step = outer
        _issued.clear()
        _issued.update(saved)


class StepCounter:
    """Numbers the calls of a step function on the host and runs each in :func:`step_scope`.

    Costs no device sync (it never reads the state's step tensor). The first call is step 1; a
    scope the caller already opened wins, so a loop that knows the run's true step (after a
    resume) can wrap its call in ``step_scope(global_step)``.

    Example:
        >>> steps = StepCounter()
        >>> with steps.scope():
        ...     current_step()
        1
        >>> with step_scope(1001), steps.scope():
        ...     current_step()
        1001
    """

    def __init__(self) -> None:
        self.calls = 0

    def scope(self) -> contextlib.AbstractContextManager[None]:
        """The scope of the next call."""
        self.calls += 1
        return contextlib.nullcontext() if _step is not None else step_scope(self.calls)


def current_step() -> int | None:
    """The step set by the innermost :func:`step_scope`, or None outside one."""
    return _step


def set_spmd_check(enabled: bool) -> bool:
    """Turn the SPMD check on or off in this process; returns the previous setting.

    Every rank must use the same setting (the check is itself a collective). The default comes
    from ``FUNCZERO_SPMD_CHECK`` (``1`` turns it on).
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_spmd_check(enabled={enabled!r}): pass True or False")
    previous, _enabled = _enabled, enabled
    return previous


def spmd_check_enabled() -> bool:
    """Whether collectives are compared across ranks before they are issued."""
    return _enabled


def rank_and_step() -> str:
    """``"rank R, step S"`` (or ``"rank R"`` outside a step) for error messages."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return f"rank {rank}" if _step is None else f"rank {rank}, step {_step}"


def collective_failed(label: str, error: BaseException) -> CollectiveError:
    """The error for collective ``label`` that raised ``error`` (failed or timed out)."""
    return CollectiveError(
        f"{rank_and_step()}: {label} did not complete ({type(error).__name__}: {error}). Every rank "
        "must run the same collectives in the same order: check for a rank that skipped a unit "
        "(a data-dependent branch in forward), ran another number of micro-batches, or got a "
        "batch that changes which modules run; FUNCZERO_DIST_TIMEOUT sets how long ranks wait"
    )


def check_same_collective(describe: Callable[[], str], *, group: Any, device: torch.device) -> None:
    """Raise :class:`CollectiveError` on every rank of ``group`` unless all are about to issue
    the same collective. Collective; call only when :func:`spmd_check_enabled`.

    ``describe()`` names the collective: its kind, unit, size and dtype (anything that must
    match across ranks, nothing that may differ, such as data). ``device`` is where the
    fingerprint travels: the device of the collective's own tensors.
    """
    if not dist.is_initialized():
        return
    key = id(group)
    position = _issued.get(key, 0)
    _issued[key] = position + 1
    what = describe()
    digest = hashlib.blake2b(what.encode(), digest_size=8).digest()
    step = -1 if _step is None else _step
    mine = torch.tensor(
        [step, position, int.from_bytes(digest, "little", signed=True)],
        dtype=torch.int64,
        device=device,
    )
    try:
        rows = _all_gather(mine, group)
    except RuntimeError as e:  # a rank that never gets here (it raised, or hangs elsewhere)
        raise collective_failed(f"the {SPMD_CHECK_ENV} check before the {what}", e) from e
    if all(r == rows[0] for r in rows):
        return
    # Every rank saw the same rows, so every rank takes this branch: exchanging the
    # descriptions is itself a matched collective.
    texts = _all_gather_text(what, group, device)
    raise CollectiveError(_divergence_message(rows, texts, dist.get_rank(group)))


def _all_gather(t: torch.Tensor, group: Any) -> list[list[int]]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return [p.tolist() for p in parts]


def _all_gather_text(text: str, group: Any, device: torch.device) -> list[str]:
    data = text.encode()
    lengths = _all_gather(torch.tensor([len(data)], dtype=torch.int64, device=device), group)
    longest = max(n for (n,) in lengths)
    padded = torch.zeros(longest, dtype=torch.int64, device=device)
    padded[: len(data)] = torch.tensor(list(data), dtype=torch.int64)
    rows = _all_gather(padded, group)
    return [bytes(row[:n]).decode(errors="replace") for row, (n,) in zip(rows, lengths)]


def _divergence_message(rows: list[list[int]], texts: list[str], me: int) -> str:
    def at(step: int, position: int) -> str:
        return f"collective {position + 1}" + ("" if step < 0 else f" of step {step}")

    lines = [
        f"  group rank {r}{' (this rank)' if r == me else ''}: {at(s, p)}: {t}"
        for r, ((s, p, _), t) in enumerate(zip(rows, texts))
    ]
    return (
        f"{rank_and_step()}: the ranks are about to issue different collectives ({SPMD_CHECK_ENV} "
        "check); they would hang or compute garbage. Each rank's next collective:\n"
        + "\n".join(lines)
        + "\nEvery rank must run the same collectives in the same order: look for a rank that "
        "skipped a unit (a data-dependent branch in forward), ran another number of "
        "micro-batches or steps, or got a batch that changes which modules run"
    )
