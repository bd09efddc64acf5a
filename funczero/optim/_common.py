"""Private helpers shared by the transforms, aliases and fused kernels.

Precision rules that every transform follows (they are why these helpers exist):

* Optimizer math runs in at least fp32 (:func:`moment_dtype`): moments and ``eps`` never live in
  bf16/fp16, and float64 parameters keep float64 moments.
* Python-float hyperparameters stay Python floats in tensor math, so they are exact in float64.
  Schedules return float32 0-d tensors; step-dependent scalars (bias corrections, schedule
  internals) are computed in float64 (:func:`scalar_dtype`) and cast once to the moment dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from funczero.optim.base import OptState, Params, ReduceFn, ScalarOrSchedule

__all__: list[str] = []


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype optimizer math uses for a tensor of ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def zeros_moment(p: Tensor, fill: float = 0.0) -> Tensor:
    """A moment buffer shaped like ``p`` in :func:`moment_dtype` (never aliasing ``p``)."""
    return torch.full_like(
        p, fill, dtype=moment_dtype(p.dtype), memory_format=torch.contiguous_format
    )


def params_device(params: Mapping[str, Tensor]) -> torch.device:
    """The device of the first parameter (CPU for an empty tree)."""
    for p in params.values():
        return p.device
    return torch.device("cpu")


def zero_count(params: Mapping[str, Tensor]) -> Tensor:
    """A fresh int64 0-d step counter on the parameters' device."""
    return torch.zeros((), dtype=torch.int64, device=params_device(params))


def resolve(hparam: ScalarOrSchedule, count: Tensor | None) -> float | Tensor:
    """Evaluate a hyperparameter for the update that sees ``count``.

    Floats stay floats (exact in any dtype); tensors are returned as they are; schedules are
    called with ``count``.
    """
    if callable(hparam):
        if count is None:
            raise ValueError("a schedule needs a step count, but this state carries none")
        return hparam(count)
    return hparam


def scalar_dtype(device: torch.device) -> torch.dtype:
    """float64 for step-dependent scalars, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def bias_correction(decay: float | Tensor, count: Tensor) -> Tensor:
    """``1 - decay ** (count + 1)`` as a float64 0-d tensor (exact enough for float64 parity)."""
    t = (count + 1).to(scalar_dtype(count.device))
    if isinstance(decay, Tensor):
        decay = decay.to(device=t.device, dtype=t.dtype)
    return 1.0 - torch.pow(decay, t)


def require_params(params: Params | None, who: str) -> Params:
    """Raise a helpful error when a transform that needs ``params`` did not get them."""
    if params is None:
        raise ValueError(f"{who} needs the current parameters: call update(updates, state, params)")
    return params


def reduce(x: Tensor, reduce_fn: ReduceFn | None) -> Tensor:
    """Apply ``reduce_fn`` (all-reduce SUM of partial sums across shards) when there is one."""
    return x if reduce_fn is None else reduce_fn(x)


def sum_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor local sums of squares as one 1-D tensor in at least fp32.

    Uses ``torch._foreach_norm`` (no full-size temporaries) when every tensor already has the
    accumulation dtype, and an upcasting ``vector_norm`` otherwise.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    acc = moment_dtype(tensors[0].dtype)
    for t in tensors[1:]:
        acc = torch.promote_types(acc, moment_dtype(t.dtype))
    if all(t.dtype == acc for t in tensors):
        norms = list(torch._foreach_norm(list(tensors)))
    else:
        norms = [torch.linalg.vector_norm(t, dtype=acc) for t in tensors]
    return torch.stack(norms).square()


def find_state(state: OptState, cls: type) -> Any:
    """Return the first member of a chain state (a tuple) that is an instance of ``cls``."""
    if isinstance(state, cls):
        return state
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        for s in state:
            found = find_state(s, cls)
            if found is not None:
                return found
    return None


def advance_counts(state: OptState, found_inf: Tensor | None) -> OptState:
    """Return ``state`` with every ``count`` field advanced by one, or by zero when ``found_inf``.

    Branch-free: the increment is ``(found_inf == 0)`` as int64, so no host sync happens.
    """
    if hasattr(state, "_fields"):
        if "count" in state._fields:
            inc: Tensor | int = 1
            if found_inf is not None:
                inc = (found_inf == 0).to(torch.int64)
            return state._replace(count=state.count + inc)
        return state
    if isinstance(state, tuple):
        return tuple(advance_counts(s, found_inf) for s in state)
    return state


# --------------------------------------------------------------------------- validation


def _fmt(value: Any) -> str:
    return repr(value) if not isinstance(value, Tensor) else f"tensor(shape={tuple(value.shape)})"


def check_float(
    who: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """Validate a Python-number hyperparameter at build time and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {name}={_fmt(value)} must be a Python float{hint}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{who}: {name}=nan is not a number{hint}")
    if low is not None and value < low:
        raise ValueError(f"{who}: {name}={value!r} must be >= {low}{hint}")
    if high is not None and (value >= high if high_open else value > high):
        rel = "<" if high_open else "<="
        raise ValueError(f"{who}: {name}={value!r} must be {rel} {high}{hint}")
    return value


def check_hparam(
    who: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    hint: str = "",
) -> ScalarOrSchedule:
    """Validate a float-or-tensor-or-schedule hyperparameter; floats are range-checked."""
    if callable(value):
        return value
    if isinstance(value, Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise ValueError(
                f"{who}: {name} must be a float, a floating 0-d tensor or a schedule, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}"
            )
        return value
    return check_float(who, name, value, low=low, high=high, high_open=high_open, hint=hint)


def check_keys(who: str, updates: Mapping[str, Any], tree: Mapping[str, Any]) -> None:
    """Raise unless ``updates`` has exactly the parameters the state was initialised with.

    A missing key would silently drop that parameter's moments from the new state.
    """
    if updates.keys() != tree.keys():
        missing = sorted(set(tree) - set(updates))[:5]
        unknown = sorted(set(updates) - set(tree))[:5]
        raise KeyError(
            f"{who}: the updates and the optimizer state disagree on the parameters (missing "
            f"from the updates: {missing}, unknown to the state: {unknown}); pass a gradient for "
            "every parameter the state was initialised with (zeros for frozen ones)"
        )


def keys_of(tree: Mapping[str, Any], keys: Iterable[str]) -> list[Any]:
    """``[tree[k] for k in keys]`` with an error that names a missing key."""
    out = []
    for k in keys:
        try:
            out.append(tree[k])
        except KeyError:
            raise KeyError(
                f"optimizer state has no entry for parameter {k!r}; it was initialised for a "
                "different set of parameters"
            ) from None
    return out


# --------------------------------------------------------------------------- state trees


def tree_where(cond: Tensor, new: OptState, old: OptState) -> OptState:
    """Leafwise ``torch.where(cond, new, old)`` over two states of one structure (no host sync)."""
    return optree.tree_map(lambda n, o: torch.where(cond.to(n.device), n, o), new, old)


def state_on(state: OptState, params: Mapping[str, Tensor]) -> OptState:
    """``state`` with every tensor on the parameters' device.

    A transform initialised on an empty subset of the parameters puts its counters on the CPU
    (:func:`zero_count`); this keeps them next to the other parameters' state.
    """
    if not params:
        return state
    device = params_device(params)
    return optree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, state)
