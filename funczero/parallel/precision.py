"""Mixed-precision policy: which dtype parameters are computed, kept and reduced in.

Example:
    >>> Precision.from_name("bf16").compute_dtype
    torch.bfloat16
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

PrecisionName = Literal["fp32", "bf16", "fp16"]

__all__ = ["Precision", "PrecisionName"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Precision:
    """Dtypes of one training run.

    Attributes:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        compute_dtype: dtype of the parameters the model runs on (and of ZeRO all-gathers).
        master_dtype: dtype of the weights the optimizer updates (always fp32).
        reduce_dtype: dtype gradients are reduced in (DeepSpeed's ``communication_data_type``);
            fp32 by default, because bf16 reductions drift measurably after a few steps.
    """

    name: PrecisionName = "fp32"
    compute_dtype: torch.dtype = torch.float32
    master_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    @classmethod
    def from_name(cls, name: str, *, reduce_dtype: str | None = None) -> Precision:
        """Build the policy for ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
        if name not in _DTYPES:
            raise ValueError(f"precision {name!r} is not one of {sorted(_DTYPES)}")
        if reduce_dtype is not None and reduce_dtype not in _DTYPES:
            raise ValueError(
                f"communication_data_type {reduce_dtype!r} is not one of {sorted(_DTYPES)}"
            )
        reduce = _DTYPES[reduce_dtype] if reduce_dtype else torch.float32
        return cls(name, _DTYPES[name], torch.float32, reduce)  # type: ignore[arg-type]

    @property
    def mixed(self) -> bool:
        """Whether compute runs in a lower precision than the master weights."""
        return self.compute_dtype != self.master_dtype
